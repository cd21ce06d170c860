"""What a study is: its settings from ``tuning.<study>``, its search space, sampler and pruner, and its
creation in the shared storage.

Study creation: :func:`create` makes the study once before any worker starts (the ``tune_create`` rule
calls it); every worker also calls :func:`load_study`, which only loads the study when it exists and
survives two workers creating it at once (Optuna's load_if_exists, plus a retry while an empty
PostgreSQL gets its tables, see :mod:`moegate.storage`). A study keeps the search space
and metrics it was created with (:data:`SPEC_KEY`); a config that asks for others is refused.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from moegate import studies
from moegate.config import RENAMED, ConfigError, get_dotted, set_dotted
from moegate.config import validate as validate_config
from moegate.storage import describe, open_storage, study_name

log = logging.getLogger(__name__)

SPEC_KEY = "moegate.spec"  # study user attr: the search space and metrics it was created with


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
            try:
                node = get_dotted(config, key)
            except ConfigError:
                raise ConfigError(f"{where}: the config has no key {key!r} to tune") from None
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
        set_dotted(out, key, value)  # a ConfigError naming the key when its section is missing
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
        renamed = [f"{old} is now {new}" for old, new in RENAMED.items() if old in recorded["search_space"]]
        advice = (f"{'; '.join(renamed)}, so it cannot continue: set tuning.study_prefix to start a new study"
                  if renamed else "Restore those settings to continue it, or set tuning.study_prefix to start "
                  "a new study")
        raise ConfigError(
            f"study {name} in {describe(config)} was created for metrics {recorded['metrics']} "
            f"({', '.join(found)}) and search space {recorded['search_space']}; tuning.{spec.study} now asks "
            f"for {wanted['metrics']} and {wanted['search_space']}. {advice}")
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
