"""Hyperparameter tuning: one shared Optuna study per stage, N parallel workers, an exact budget.

The studies and their order live in :mod:`moegate.studies`; each worker first overlays the tuned values
of the studies before it (:func:`moegate.tuned.apply_tuned`), and every trial parameter is a dotted
config key. A trial's objective is its study's trainer's ``fit`` (``Study.trainer``: ``train_backbone``
or ``train_router``); what each study tunes is ``tuning.<study>.search_space``. Trials live in the
storage of :mod:`moegate.storage` (journal file or RDB), which also fails and re-queues stale trials.

One module per step, in the order a study runs (the rules tune_create → tune_worker → tune_collect):

- :mod:`moegate.stages.tune.study`: what a study is (:class:`StudySpec`), its search space, sampler and
  pruner; :func:`create` it in the storage once.
- :mod:`moegate.stages.tune.workers`: :func:`worker`, the ask-and-tell loop N processes run on the
  shared study, and the exact budget (admission check) they keep.
- :mod:`moegate.stages.tune.results`: :func:`collect` the finished study into ``tuning/{study}.json``.
"""

from moegate.stages.tune.results import NOTE_NO_TRIALS, collect
from moegate.stages.tune.study import (
    SPEC_KEY,
    StudySpec,
    create,
    load_study,
    make_pruner,
    make_sampler,
    sampler_seed,
    suggest,
    with_params,
)
from moegate.stages.tune.workers import (
    ERROR_KEY,
    OBJECTIVES,
    RELEASED_KEY,
    Objective,
    admitted,
    budget_counts,
    worker,
)

__all__ = [
    "ERROR_KEY", "NOTE_NO_TRIALS", "OBJECTIVES", "RELEASED_KEY", "SPEC_KEY", "Objective", "StudySpec",
    "admitted", "budget_counts", "collect", "create", "load_study", "make_pruner", "make_sampler",
    "sampler_seed", "suggest", "with_params", "worker",
]
