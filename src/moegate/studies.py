"""The tuning studies: the one registry the layout, the rules, the trainers, the CLI and the tuner read.

Adding a study is one entry here (plus its ``tuning.<name>`` section in the config schema).

Order matters: :data:`STUDIES` is a topological order of ``after``, and a trial of a study first
overlays the tuned values of every study before it in this order whose ``tuning/<study>.json`` exists
(:func:`overlaid_before`). ``after`` is what a study's jobs wait for (its rule's inputs): the router
studies reach the backbone study through the fine-tuned ``backbone/`` (encoder_mode finetune), not
through ``after``, so with a frozen encoder the router studies do not wait for the backbone's tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from moegate.errors import MoegateError

TRAINERS = ("backbone", "router")  # moegate.train_<trainer>.fit runs a trial


@dataclass(frozen=True)
class Study:
    """One Optuna study: its name (``tuning.<name>``, ``tuning/<name>.json``) and how it runs."""

    name: str
    trainer: str  # "backbone" | "router": whose fit(config, trial) is the objective
    after: tuple[str, ...] = ()  # studies whose tuning/<s>.json its jobs wait for (and overlay, in this order)
    # fixed objective(s) and directions; empty: one objective from tuning.<name>.metric / .direction
    metrics: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()
    pareto: bool = False  # collect writes tuning/<name>_pareto.{csv,png} (a two-objective study)
    summary: str = ""  # what it tunes, for --help

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


STUDIES: tuple[Study, ...] = (
    Study("backbone", "backbone",
          summary="backbone lr, weight decay, batch size, dropout, epochs; pruned on per-epoch val accuracy"),
    Study("submodels", "router", summary="the DACT heads (router.head.*) on the tuned backbone"),
    Study("training", "router", after=("submodels",),
          summary="router lr, weight decay, batch size, epochs (λ, split fixed)"),
    Study("lambda", "router", after=("submodels", "training"),
          metrics=("val_accuracy", "val_mean_layers"), directions=("maximize", "minimize"), pareto=True,
          summary="λ, two objectives: val accuracy ↑, mean executed layers ↓; λ from the Pareto front"),
)
NAMES: tuple[str, ...] = tuple(s.name for s in STUDIES)
_BY_NAME = {s.name: s for s in STUDIES}


def get(name: str) -> Study:
    """The study called ``name``; MoegateError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise MoegateError(f"unknown study {name!r}; expected one of {', '.join(NAMES)}") from None


def overlaid_before(name: str) -> tuple[str, ...]:
    """The studies whose tuned values a trial of ``name`` starts from: every one before it, in order."""
    return NAMES[:NAMES.index(get(name).name)]


def trained_by(trainer: str) -> tuple[str, ...]:
    """The studies whose trials run ``trainer``'s fit, in order (that trainer's rule waits for them)."""
    if trainer not in TRAINERS:
        raise ValueError(f"unknown trainer {trainer!r}; expected one of {', '.join(TRAINERS)}")
    return tuple(s.name for s in STUDIES if s.trainer == trainer)


def _check() -> None:
    """The registry's own invariants, checked at import: names unique, ``after`` a topological order."""
    seen: set[str] = set()
    for s in STUDIES:
        if s.name in seen:
            raise AssertionError(f"study {s.name!r} is registered twice")
        if s.trainer not in TRAINERS:
            raise AssertionError(f"study {s.name!r}: unknown trainer {s.trainer!r}")
        late = [a for a in s.after if a not in seen]
        if late:
            raise AssertionError(f"study {s.name!r} runs after {late}, which are not registered before it")
        if len(s.metrics) != len(s.directions):
            raise AssertionError(f"study {s.name!r}: {len(s.metrics)} metrics but {len(s.directions)} directions")
        seen.add(s.name)


_check()


# -- the λ study's rule (also the λ sweep's, when no study ran: moegate.stages.train_router.sweep_lambda) --
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (accuracy ↑, mean layers ↓) no other point dominates, in input order."""
    front = []
    for i, (acc, layers) in enumerate(points):
        dominated = any(a >= acc and m <= layers and (a > acc or m < layers) for a, m in points)
        if not dominated:
            front.append(i)
    return front


def choose_lambda(rows: list[dict], tolerance: float) -> dict:
    """The λ rule: among rows within ``tolerance`` of the best val_accuracy, the fewest val_mean_layers.

    Ties go to the higher accuracy, then the lower trial number. The chosen row is on the Pareto front.
    """
    if not rows:
        raise ValueError("choose_lambda: no completed trials")
    best = max(r["val_accuracy"] for r in rows)
    within = [r for r in rows if r["val_accuracy"] >= best - tolerance - 1e-12]
    return min(within, key=lambda r: (r["val_mean_layers"], -r["val_accuracy"], r["trial"]))
