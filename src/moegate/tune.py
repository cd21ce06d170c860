"""Hyperparameter tuning: one shared Optuna study per stage, N parallel workers, an exact budget.

The studies and their order live in :mod:`moegate.studies`; each worker first overlays the tuned values
of the studies before it (:func:`moegate.tuned.apply_tuned`), and every trial parameter is a dotted
config key. A trial's objective is its study's trainer's ``fit`` (``Study.trainer``: ``train_backbone``
or ``train_router``); what each study tunes is ``tuning.<study>.search_space``.

Study creation: :func:`create` makes the study once before any worker starts (``launch`` and the
``tune_create`` rule call it); every worker also calls it, which only loads the study when it exists
and survives two workers creating it at once (Optuna's load_if_exists, plus a retry while an empty
PostgreSQL gets its tables, see :mod:`moegate.storage`).

Budget guarantee: ``n_trials`` counts COMPLETE trials across all workers, and the study never holds
more than ``n_trials`` of them. Each worker runs Optuna's ask-and-tell loop itself: ``optimize`` with
``MaxTrialsCallback`` counts only after a trial ends, so N workers could overshoot by up to N−1.
Before each ask a worker fails stale trials (:mod:`moegate.storage`) and waits while COMPLETE +
RUNNING trials already fill the budget. The remaining race, two workers asking at once for the last
slot, is settled by an admission check on the new trial: it may run only if COMPLETE + (RUNNING or
WAITING trials numbered below it) is under the budget. Every storage numbers trials in creation
order, so the highest-numbered of any set of admitted trials saw all the others: at most
``n_trials`` are ever admitted at once. A refused trial is told FAIL with ``moegate.released`` (a
refused retry's params are queued again). Workers exit once the budget is met and nothing is
RUNNING, so a rerun after a kill ends with exactly ``n_trials`` COMPLETE and no RUNNING trial.
Failed (exception) and pruned trials do not count; a worker gives up after ``max_failures`` failures
in a row.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from moegate import studies
from moegate.config import ConfigError
from moegate.config import dump as dump_config
from moegate.config import validate as validate_config
from moegate.io import atomic_path, save_figure, write_json, write_text
from moegate.layout import Layout
from moegate.storage import (
    HEARTBEAT_KEY,
    OWNER_KEY,
    STALE_KEY,
    Heartbeat,
    StorageSettings,
    claim,
    describe,
    open_storage,
    recover_stale_trials,
    study_name,
)
from moegate.tuned import apply_tuned, set_dotted

log = logging.getLogger(__name__)

SPEC_KEY = "moegate.spec"  # study user attr: the search space and metrics it was created with
RELEASED_KEY = "moegate.released"  # trial user attr: refused by the admission check (not a failure)
ERROR_KEY = "moegate.error"  # trial user attr: the objective's exception
NOTE_NO_TRIALS = "n_trials is 0: no tuning ran; the config's values stand"

Objective = Callable[[dict, "optuna.Trial | None"], dict]


# -- the objective of each study --------------------------------------------------------------------

def _fit_backbone(config: dict, trial: optuna.Trial | None) -> dict:
    from moegate.train_backbone import fit

    return fit(config, trial=trial)


def _fit_router(config: dict, trial: optuna.Trial | None) -> dict:
    from moegate.train_router import fit

    return fit(config, trial=trial)


OBJECTIVES: dict[str, Objective] = {"backbone": _fit_backbone, "router": _fit_router}  # by Study.trainer


# -- what a study is, from the config ---------------------------------------------------------------

@dataclass(frozen=True)
class StudySpec:
    """One study's settings from ``tuning.<study>``, checked against the config it tunes."""

    study: str
    n_trials: int
    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    sampler: str
    pruner: str
    search_space: dict

    @classmethod
    def from_config(cls, config: dict, study: str) -> StudySpec:
        if study not in studies.NAMES:
            raise ConfigError(f"unknown study {study!r}; expected one of {', '.join(studies.NAMES)}")
        registered = studies.get(study)
        section = config["tuning"][study]
        if registered.metrics:  # fixed objectives (λ: two of them, so nothing to prune on)
            metrics, directions, pruner = registered.metrics, registered.directions, "none"
        else:
            metrics, directions, pruner = (section["metric"],), (section["direction"],), section["pruner"]
            if pruner != "none" and (metrics[0] != "val_accuracy" or directions[0] != "maximize"):
                raise ConfigError(f"tuning.{study}.pruner: {pruner} prunes on per-epoch val_accuracy; it needs "
                                  f"metric: val_accuracy and direction: maximize (or pruner: none)")
        spec = cls(study, section["n_trials"], metrics, directions, section["sampler"], pruner,
                   copy.deepcopy(section["search_space"]))
        spec.check_search_space(config)
        return spec

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def prunable(self) -> bool:
        return self.pruner != "none" and not self.multi_objective

    def check_search_space(self, config: dict) -> None:
        """Every key names an existing config value; ranges are ordered; log ranges are positive."""
        if self.n_trials > 0 and not self.search_space:
            raise ConfigError(f"tuning.{self.study}.search_space: empty, but n_trials is {self.n_trials}")
        for key, dist in self.search_space.items():
            where = f"tuning.{self.study}.search_space.{key}"
            node = config
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"{where}: the config has no key {key!r} to tune")
                node = node[part]
            if isinstance(node, dict):
                raise ConfigError(f"{where}: {key!r} is a config section, not a value")
            if dist["type"] in ("float", "int"):
                if dist["low"] > dist["high"]:
                    raise ConfigError(f"{where}: low ({dist['low']}) is above high ({dist['high']})")
                if dist.get("log") and dist["low"] <= 0:
                    raise ConfigError(f"{where}: a log range needs low > 0 (got {dist['low']})")
                if dist.get("log") and dist.get("step") not in (None, 1):
                    raise ConfigError(f"{where}: log and step cannot be combined")


def suggest(trial: optuna.Trial, search_space: dict) -> dict[str, Any]:
    """Ask the trial for a value of each dotted key in ``search_space``; {key: value}."""
    params = {}
    for key, dist in search_space.items():
        kind = dist["type"]
        if kind == "float":
            params[key] = trial.suggest_float(key, dist["low"], dist["high"], log=dist.get("log", False),
                                              step=dist.get("step"))
        elif kind == "int":
            params[key] = trial.suggest_int(key, dist["low"], dist["high"], log=dist.get("log", False),
                                            step=dist.get("step", 1))
        else:
            params[key] = trial.suggest_categorical(key, dist["choices"])
    return params


def with_params(config: dict, params: dict[str, Any]) -> dict:
    """A validated copy of ``config`` with each dotted key set to its value."""
    out = copy.deepcopy(config)
    for key, value in params.items():
        set_dotted(out, key, value)
    return validate_config(out, source="trial parameters")


def sampler_seed(seed: int, worker: int, trials: list[FrozenTrial]) -> int:
    """The seed of a worker's sampler for its next trial: the run's seed, the worker, and how many
    trials the study has sampled so far (a re-queued retry of a killed trial samples nothing and does
    not count). So a worker killed mid-trial and rerun draws, after the retry, the points an
    uninterrupted run draws (with one worker; with several, their interleaving decides anyway), and no
    two workers replay the same random start."""
    return seed + 1000 * worker + sum("failed_trial" not in t.system_attrs for t in trials)


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "tpe":  # multi-objective too; the constant liar keeps parallel workers off each other's points
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(kind: str) -> optuna.pruners.BasePruner:
    if kind == "median":  # from the 2nd epoch, once 2 trials have completed
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def load_study(config: dict, spec: StudySpec, storage=None) -> optuna.Study:
    """Create the study if missing, else load it; refuse one made with another search space or metric."""
    storage = storage or open_storage(config)
    name = study_name(config, spec.study)
    study = optuna.create_study(study_name=name, storage=storage, directions=list(spec.directions),
                                load_if_exists=True)
    found = tuple(d.name.lower() for d in study.directions)
    recorded = study.user_attrs.get(SPEC_KEY)
    wanted = {"metrics": list(spec.metrics), "search_space": spec.search_space}
    if recorded is None:
        study.set_user_attr(SPEC_KEY, wanted)
        recorded = wanted
    if found != spec.directions or recorded != wanted:
        raise ConfigError(
            f"study {name} in {describe(config)} was created for metrics {recorded['metrics']} "
            f"({', '.join(found)}) and search space {recorded['search_space']}; tuning.{spec.study} now asks "
            f"for {wanted['metrics']} and {wanted['search_space']}. Restore those settings to continue it, "
            "or set tuning.study_prefix to start a new study")
    if study.metric_names != list(spec.metrics):  # named objectives in optuna-dashboard; set once per study
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.metrics))
    return study


def create(config: dict, study: str) -> str | None:
    """Create the study in the storage before workers start; its name (None when n_trials is 0)."""
    spec = StudySpec.from_config(config, study)
    if spec.n_trials == 0:
        log.info("tuning.%s.n_trials is 0: no study to create", study)
        return None
    st = load_study(config, spec)
    complete = len(st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    log.info("study %s in %s: %d of %d trials complete", st.study_name, describe(config), complete, spec.n_trials)
    return st.study_name


# -- the budget -------------------------------------------------------------------------------------

def budget_counts(trials: list[FrozenTrial]) -> tuple[int, int]:
    """(COMPLETE, RUNNING) trials."""
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return complete, running


def admitted(trials: list[FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether trial ``number`` may run: COMPLETE + RUNNING/WAITING trials numbered below it < budget."""
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    ahead = sum(t.number < number and t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return complete + ahead < n_trials


class _Worker:
    """One worker's ask-and-tell loop on the shared study (see the module docstring for the guarantees)."""

    def __init__(self, config: dict, spec: StudySpec, worker_index: int, objective: Objective):
        self.config, self.spec, self.index, self.objective = config, spec, worker_index, objective
        self.settings = StorageSettings.from_config(config)
        self.wait_s = config["tuning"]["wait_s"]
        self.max_failures = config["tuning"]["max_failures"]
        self.ran: dict[str, int] = {}
        self.study: optuna.Study | None = None

    def run(self) -> dict:
        t0 = time.monotonic()
        study = self.study = load_study(self.config, self.spec, open_storage(self.config))
        study.pruner = make_pruner(self.spec.pruner)
        n = self.spec.n_trials
        log.info("worker %d: study %s in %s, budget %d complete trials", self.index, study.study_name,
                 describe(self.config), n)
        waiting, failures_in_row = None, 0
        while True:
            complete, running = self._recover_and_count()
            if complete >= n and running == 0:
                break
            if complete + running >= n:  # other trials fill the budget; one may still fail and free a slot
                if waiting != (complete, running):
                    log.info("worker %d: %d complete + %d running fill the budget of %d; waiting",
                             self.index, complete, running, n)
                    waiting = (complete, running)
                time.sleep(self.wait_s)
                continue
            waiting = None
            seed = sampler_seed(self.config["seed"], self.index, study.get_trials(deepcopy=False))
            study.sampler = make_sampler(self.spec.sampler, seed)
            with warnings.catch_warnings():  # we run the heartbeat ourselves (storage.Heartbeat), not optimize
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = study.ask()
            outcome, error = self._run_trial(trial)
            self.ran[outcome] = self.ran.get(outcome, 0) + 1
            if outcome == "fail":
                failures_in_row += 1
            elif outcome in ("complete", "pruned"):
                failures_in_row = 0
            if failures_in_row >= self.max_failures:
                raise RuntimeError(f"worker {self.index}: {failures_in_row} trials of study {study.study_name} "
                                   f"failed in a row (tuning.max_failures); last error: {error}")
        summary = {"study": study.study_name, "worker": self.index, "n_trials": n, "n_complete": complete,
                   "ran": dict(self.ran), "wall_s": round(time.monotonic() - t0, 3)}
        log.info("worker %d: budget met (%d complete); this worker's trials: %s; %.1f s", self.index, complete,
                 self.ran or "none", summary["wall_s"])
        return summary

    def _recover_and_count(self) -> tuple[int, int]:
        complete, running = budget_counts(self.study.get_trials(deepcopy=False))
        if running and recover_stale_trials(self.study, self.settings, requeue=complete < self.spec.n_trials):
            complete, running = budget_counts(self.study.get_trials(deepcopy=False))
        return complete, running

    def _run_trial(self, trial: optuna.Trial) -> tuple[str, str | None]:
        """Admit, run and tell one trial; (outcome, error): complete | pruned | fail | released | superseded."""
        study = self.study
        claim(trial, self.index, self.settings.is_journal)
        if not admitted(study.get_trials(deepcopy=False), trial.number, self.spec.n_trials):
            self._release(trial)
            return "released", None
        state, values, error = TrialState.FAIL, None, None
        try:
            with Heartbeat(trial.storage, trial._trial_id, self.settings.heartbeat_interval, self.settings.is_journal):
                params = suggest(trial, self.spec.search_space)
                log.info("worker %d: trial %d: %s", self.index, trial.number, params)
                result = self.objective(with_params(self.config, params), trial if self.spec.prunable else None)
                values = self._values(trial, result)
            state = TrialState.COMPLETE
        except optuna.TrialPruned as e:
            state = TrialState.PRUNED
            log.info("worker %d: trial %d pruned: %s", self.index, trial.number, e)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker found our heartbeat stale and failed the trial; its params are queued again
        except Exception as e:  # one bad trial (e.g. out of memory at some batch size) must not end the study
            error = f"{type(e).__name__}: {e}"
            log.warning("worker %d: trial %d failed: %s", self.index, trial.number, error, exc_info=True)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr(ERROR_KEY, error[:2000])
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)  # never leave it RUNNING
            raise
        finally:
            gc.collect()  # free the trial's model before the next one
        told = study.tell(trial, values, state=state, skip_if_finished=True)
        if told.state != state:
            log.warning("worker %d: trial %d was failed by another worker meanwhile (heartbeat older than %d s); "
                        "its result is dropped and its params run again", self.index, trial.number,
                        self.settings.grace_period)
            return "superseded", None
        if state == TrialState.COMPLETE:
            log.info("worker %d: trial %d complete: %s", self.index, trial.number,
                     dict(zip(self.spec.metrics, values if self.spec.multi_objective else (values,))))
        return state.name.lower(), error

    def _values(self, trial: optuna.Trial, result: dict):
        """Record the scalar metrics on the trial; the objective value(s) in the study's metric order."""
        for key, value in result.items():  # for the trials summary and the Pareto CSV
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                trial.set_user_attr(key, float(value))
        missing = [m for m in self.spec.metrics if m not in result]
        if missing:
            raise KeyError(f"the {self.spec.study} objective returned {sorted(result)}; "
                           f"tuning.{self.spec.study} needs {missing}")
        values = tuple(float(result[m]) for m in self.spec.metrics)
        return values if self.spec.multi_objective else values[0]

    def _release(self, trial: optuna.Trial) -> None:
        """Fail a refused trial, marked as released; a refused retry (fixed params) is queued again."""
        frozen = trial.storage.get_trial(trial._trial_id)
        trial.set_user_attr(RELEASED_KEY, f"over budget when asked (worker {self.index})")
        self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if frozen.params or "fixed_params" in frozen.system_attrs:
            self.study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
                user_attrs={k: v for k, v in frozen.user_attrs.items() if k != OWNER_KEY},
                system_attrs={k: v for k, v in frozen.system_attrs.items() if k != HEARTBEAT_KEY}))
        log.info("worker %d: trial %d refused: the budget of %d is taken by other workers", self.index,
                 trial.number, self.spec.n_trials)


def worker(config: dict, study: str, worker_index: int = 0, objective: Objective | None = None) -> dict:
    """Run trials of ``study`` until the shared budget is met; writes nothing but trials.

    ``objective(config, trial_or_None) -> metrics dict`` replaces the study's fit function (tests).
    Returns {study, worker, n_trials, n_complete, ran: {state: count}, wall_s}.
    """
    spec = StudySpec.from_config(config, study)
    if spec.n_trials == 0:
        log.info("tuning.%s.n_trials is 0: nothing to run", study)
        return {"study": None, "worker": worker_index, "n_trials": 0, "n_complete": 0, "ran": {}, "wall_s": 0.0}
    before = studies.overlaid_before(study)
    tuned_config, used = apply_tuned(config, before)
    missing = [s for s in before if s not in used]
    if missing:
        log.warning("worker %d: no tuned values from %s yet (tuning/*.json); their config values stand",
                    worker_index, ", ".join(missing))
    return _Worker(tuned_config, spec, worker_index, objective or OBJECTIVES[studies.get(study).trainer]).run()


# -- collect: the chosen values ---------------------------------------------------------------------

def _trial_summary(t: FrozenTrial) -> dict:
    user = t.user_attrs
    duration = (t.datetime_complete - t.datetime_start).total_seconds() \
        if t.datetime_complete and t.datetime_start else None
    note = user.get(RELEASED_KEY) or user.get(STALE_KEY) or user.get(ERROR_KEY)
    return {
        "number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
        "metrics": {k: v for k, v in user.items() if not k.startswith("moegate.")},
        "duration_s": round(duration, 3) if duration is not None else None,
        "worker": user.get(OWNER_KEY), "retry_of": t.system_attrs.get("failed_trial"), "note": note,
    }


def _best(trials: list[FrozenTrial], direction: str) -> FrozenTrial:
    sign = -1.0 if direction == "maximize" else 1.0
    return min(trials, key=lambda t: (sign * t.value, t.number))  # ties: the earlier trial


def collect(config: dict, study: str, launch_info: dict | None = None) -> dict:
    """Write tuning/{study}.json from the finished study (a Pareto study: also {study}_pareto.csv/.png).

    Reads the study only; fails when fewer than ``n_trials`` trials completed (rerun the workers).
    With ``n_trials: 0`` it writes empty params and a note without touching the storage.
    """
    spec = StudySpec.from_config(config, study)
    layout = Layout.from_config(config)
    out: dict[str, Any] = {"study": study_name(config, study), "storage": describe(config),
                           "n_trials": spec.n_trials, "metrics": list(spec.metrics),
                           "directions": list(spec.directions)}
    if spec.n_trials == 0:
        out.update({"n_complete": 0, "params": {}, "note": NOTE_NO_TRIALS})
        if launch_info:
            out["launch"] = launch_info
        if studies.get(study).pareto:
            _write_pareto(layout, [], None, spec, config)
        write_json(layout.tuned(study), out)
        log.info("tuning/%s.json: %s", study, NOTE_NO_TRIALS)
        return out
    storage = open_storage(config)
    try:
        st = optuna.load_study(study_name=out["study"], storage=storage)
    except KeyError:
        raise RuntimeError(f"study {out['study']} not found in {describe(config)}: run its workers first "
                           f"(moegate tune launch {study} --workers N)") from None
    trials = st.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) < spec.n_trials:
        raise RuntimeError(f"study {out['study']} in {describe(config)}: {len(complete)} of {spec.n_trials} "
                           "trials complete; rerun the workers to finish the budget")
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    out.update({"n_complete": len(complete), "states": states,
                "released": sum(RELEASED_KEY in t.user_attrs for t in trials)})
    if studies.get(study).pareto:
        rows = [_pareto_row(t) for t in complete]
        chosen = studies.choose_lambda(rows, config["tuning"][study]["accuracy_tolerance"])
        front = {rows[i]["trial"] for i in studies.pareto_front([(r["val_accuracy"], r["val_mean_layers"]) for r in rows])}
        out.update({
            "params": dict(st.trials[chosen["trial"]].params),
            "rule": "fewest val_mean_layers among trials within accuracy_tolerance of the best val_accuracy; "
                    "ties: higher val_accuracy, then lower trial number",
            "accuracy_tolerance": config["tuning"][study]["accuracy_tolerance"],
            "chosen": chosen,
            "pareto": sorted((r for r in rows if r["trial"] in front), key=lambda r: r["val_mean_layers"]),
        })
        _write_pareto(layout, rows, chosen, spec, config, front)
    else:
        best = _best(complete, spec.directions[0])
        out.update({"params": dict(best.params), "best_trial": best.number,
                    "best_value": best.value, "best_metrics": _trial_summary(best)["metrics"]})
    out["trials"] = [_trial_summary(t) for t in trials]
    if launch_info:
        out["launch"] = launch_info
    write_json(layout.tuned(study), out)
    log.info("tuning/%s.json: %d complete trials; params %s", study, len(complete), out["params"])
    return out


def _pareto_row(t: FrozenTrial) -> dict:
    row = {"trial": t.number, **t.params, "val_accuracy": t.values[0], "val_mean_layers": t.values[1]}
    for key in ("val_accuracy_full_depth", "val_nll"):
        if key in t.user_attrs:
            row[key] = t.user_attrs[key]
    return row


def _write_pareto(layout: Layout, rows: list[dict], chosen: dict | None, spec: StudySpec, config: dict,
                  front: set[int] = frozenset()) -> None:
    """{study}_pareto.csv (every complete trial, with pareto/chosen flags) and {study}_pareto.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    columns = ["trial", *spec.search_space, "val_accuracy", "val_mean_layers", "val_accuracy_full_depth",
               "val_nll", "pareto", "chosen"]
    table = pd.DataFrame([{**r, "pareto": r["trial"] in front, "chosen": chosen is not None and r["trial"] ==
                           chosen["trial"]} for r in rows], columns=columns)
    table = table.sort_values(["val_mean_layers", "trial"]) if len(table) else table
    with atomic_path(layout.pareto(spec.study, "csv")) as tmp:
        table.to_csv(tmp, index=False)

    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        ax.scatter([r["val_mean_layers"] for r in rows], [100 * r["val_accuracy"] for r in rows], color="0.7",
                   label="trials")
        on_front = sorted((r for r in rows if r["trial"] in front), key=lambda r: r["val_mean_layers"])
        ax.plot([r["val_mean_layers"] for r in on_front], [100 * r["val_accuracy"] for r in on_front], "o-",
                color="tab:blue", label="Pareto front")
        for r in on_front:
            lam = r.get("router.lambda_")
            if lam is not None:
                ax.annotate(f"λ={lam:.3g}", (r["val_mean_layers"], 100 * r["val_accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        tol = config["tuning"][spec.study]["accuracy_tolerance"]
        best = max(r["val_accuracy"] for r in rows)
        ax.axhline(100 * (best - tol), color="0.5", linestyle=":", linewidth=1,
                   label=f"best − {100 * tol:g} points")
        ax.scatter([chosen["val_mean_layers"]], [100 * chosen["val_accuracy"]], marker="*", s=200, color="tab:red",
                   zorder=3, label="chosen λ")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, f"{NOTE_NO_TRIALS}\nrouter.lambda_ = {config['router']['lambda_']}", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("mean executed layers per question (validation, early exit)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("λ study: accuracy vs compute")
    ax.grid(alpha=0.3)
    save_figure(layout.pareto(spec.study, "png"), fig)
    plt.close(fig)


# -- launch: N workers outside Snakemake ------------------------------------------------------------

def _slurm_worker(config: dict, study: str, worker_index: int) -> dict:
    """The function each job of the submitit array runs (module level, so it pickles by reference)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return worker(config, study, worker_index)


def launch(config: dict, study: str, workers: int | None = None, launcher: str = "slurm",
           config_path: str | os.PathLike | None = None) -> dict:
    """Create the study, run N workers (a Slurm job array via submitit, or local processes), wait, collect.

    The workers read the run config from ``tuning/<study>/launch.yaml`` (local) or from the pickled
    config (Slurm); neither holds a password: it reaches them through the environment, which Slurm
    jobs inherit from the submitting shell (or through ~/.pgpass). Returns collect's result plus
    ``launch`` = {launcher, workers, wall_s, jobs}.
    """
    n = workers or config["tuning"]["workers"]
    if n < 1:
        raise ValueError(f"--workers must be at least 1 (got {n})")
    if launcher not in ("slurm", "local"):
        raise ValueError(f"--launcher must be slurm or local (got {launcher!r})")
    layout = Layout.from_config(config)
    create(config, study)  # once, before any worker starts
    t0 = time.monotonic()
    if launcher == "local":
        jobs = _launch_local(config, study, n, layout)
    else:
        jobs = _launch_slurm(config, study, n, layout)
    info = {"launcher": launcher, "workers": n, "wall_s": round(time.monotonic() - t0, 3), "jobs": jobs}
    log.info("study %s: %d %s worker(s) finished in %.1f s", study, n, launcher, info["wall_s"])
    return collect(config, study, launch_info=info)


def _launch_local(config: dict, study: str, n: int, layout: Layout) -> list[dict]:
    config_file = layout.tuning / study / "launch.yaml"
    write_text(config_file, dump_config(config))
    logs = layout.logs / "tune"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # the password, if any, travels here, never on the command line
    if "OMP_NUM_THREADS" not in env:  # N workers share this machine's cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    running = []
    for i in range(n):
        log_path = logs / f"{study}.local.worker{i}.log"
        cmd = [sys.executable, "-m", "moegate.cli", "tune", "worker", study, "--index", str(i),
               "--config", str(config_file)]
        with open(log_path, "w") as out:
            running.append((i, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log_path,
                            time.monotonic()))
        log.info("worker %d: pid %d, log %s", i, running[-1][1].pid, log_path)
    jobs, failed = [], []
    for i, proc, log_path, started in running:
        code = proc.wait()
        jobs.append({"worker": i, "pid": proc.pid, "returncode": code, "log": str(log_path),
                     "wall_s": round(time.monotonic() - started, 3)})
        if code != 0:
            failed.append(f"worker {i} exited with {code} (log: {log_path})")
    if failed:
        raise RuntimeError(f"study {study}: " + "; ".join(failed))
    return jobs


def _launch_slurm(config: dict, study: str, n: int, layout: Layout) -> list[dict]:
    import submitit
    from submitit.core.utils import FailedJobError, UncompletedJobError

    slurm = config["tuning"]["slurm"]
    folder = layout.logs / "tune" / "submitit" / study
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")  # never the local fallback
    params: dict[str, Any] = {"name": f"moegate-tune-{study}", "timeout_min": slurm["time_min"],
                              "mem_gb": slurm["mem_gb"], "cpus_per_task": slurm["cpus"],
                              "slurm_array_parallelism": n}
    if slurm["partition"]:
        params["slurm_partition"] = slurm["partition"]
    account = slurm["account"] or os.environ.get("MOEGATE_SLURM_ACCOUNT")
    if account:
        params["slurm_account"] = account
    if slurm["gpus"]:
        params["slurm_gres"] = f"gpu:{slurm['gpus']}"
    executor.update_parameters(**params)
    array = executor.map_array(_slurm_worker, [config] * n, [study] * n, list(range(n)))
    log.info("study %s: Slurm array %s (%d workers), logs in %s", study, array[0].job_id.split("_")[0], n, folder)
    jobs, failed = [], []
    for i, job in enumerate(array):
        try:
            summary = job.result()
            jobs.append({"worker": i, "job_id": job.job_id, "returned": True, "wall_s": summary["wall_s"]})
        except (FailedJobError, UncompletedJobError) as e:  # they carry the job's stderr tail
            jobs.append({"worker": i, "job_id": job.job_id, "returned": False, "state": job.state})
            failed.append(f"worker {i} (job {job.job_id}): {type(e).__name__}: {str(e).strip()[-500:]}")
    if failed:
        raise RuntimeError(f"study {study}: " + "; ".join(failed))
    return jobs
