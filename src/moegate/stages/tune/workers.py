"""The tuning workers: N processes share one study and its exact budget of complete trials.

Each worker runs Optuna's ask-and-tell loop itself (:func:`worker`); a trial's objective is its study's
trainer's ``fit`` (``Study.trainer``: ``train_backbone`` or ``train_router``), on the config with the
tuned values of the studies before it overlaid (:func:`moegate.tuned.apply_tuned`).

Budget guarantee: ``n_trials`` counts COMPLETE trials across all workers, and the study never holds
more than ``n_trials`` of them. ``optimize`` with ``MaxTrialsCallback`` counts only after a trial ends,
so N workers could overshoot by up to N−1; instead, before each ask a worker fails stale trials
(:func:`moegate.storage.recover_stale_trials`) and waits while COMPLETE + RUNNING trials already fill
the budget. The remaining race, two workers asking at once for the last slot, is settled by an
admission check on the new trial (:func:`admitted`): it may run only if COMPLETE + (RUNNING or WAITING
trials numbered below it) is under the budget. Every storage numbers trials in creation order, so the
highest-numbered of any set of admitted trials saw all the others: at most ``n_trials`` are ever
admitted at once. A refused trial is told FAIL with ``moegate.released`` (a refused retry's params are
queued again). Workers exit once the budget is met and nothing is RUNNING, so a rerun after a kill ends
with exactly ``n_trials`` COMPLETE and no RUNNING trial. Failed (exception) and pruned trials do not
count; a worker gives up after ``max_failures`` failures in a row.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from moegate import studies
from moegate.stages.tune.study import (
    StudySpec,
    load_study,
    make_pruner,
    make_sampler,
    sampler_seed,
    suggest,
    with_params,
)
from moegate.storage import (
    HEARTBEAT_KEY,
    OWNER_KEY,
    Heartbeat,
    StorageSettings,
    claim,
    describe,
    open_storage,
    recover_stale_trials,
)
from moegate.tuned import apply_tuned

log = logging.getLogger(__name__)

RELEASED_KEY = "moegate.released"  # trial user attr: refused by the admission check (not a failure)
ERROR_KEY = "moegate.error"  # trial user attr: the objective's exception

Objective = Callable[[dict, "optuna.Trial | None"], dict]


# -- the objective of each study --------------------------------------------------------------------

def _fit_backbone(config: dict, trial: optuna.Trial | None) -> dict:
    from moegate.stages.train_backbone import fit

    return fit(config, trial=trial)


def _fit_router(config: dict, trial: optuna.Trial | None) -> dict:
    from moegate.stages.train_router import fit

    return fit(config, trial=trial)


OBJECTIVES: dict[str, Objective] = {"backbone": _fit_backbone, "router": _fit_router}  # by Study.trainer


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
    """One worker's ask-and-tell loop on the shared study (the module docstring says what it guarantees)."""

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
