"""Collect a finished study: ``tuning/{study}.json`` with the chosen values (the best trial, or for the
two-objective λ study the rule's pick on the Pareto front, with ``{study}_pareto.{csv,png}``).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from moegate import studies
from moegate.io import atomic_path, save_figure, write_json
from moegate.layout import Layout
from moegate.stages.tune.study import StudySpec
from moegate.stages.tune.workers import ERROR_KEY, RELEASED_KEY
from moegate.storage import OWNER_KEY, STALE_KEY, describe, open_storage, study_name

log = logging.getLogger(__name__)

NOTE_NO_TRIALS = "n_trials is 0: no tuning ran; the config's values stand"


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


def collect(config: dict, study: str) -> dict:
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
        if studies.get(study).pareto:
            _write_pareto(layout, [], None, spec, config)
        write_json(layout.tuned(study), out)
        log.info("tuning/%s.json: %s", study, NOTE_NO_TRIALS)
        return out
    storage = open_storage(config)
    try:
        st = optuna.load_study(study_name=out["study"], storage=storage)
    except KeyError:
        raise RuntimeError(f"study {out['study']} not found in {describe(config)}: create it and run its "
                           f"workers first (moegate tune create {study}; moegate tune worker {study})") from None
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
            lam = r.get("router.ponder_cost")
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
        ax.text(0.5, 0.5, f"{NOTE_NO_TRIALS}\nrouter.ponder_cost = {config['router']['ponder_cost']}", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("mean executed layers per question (validation, early exit)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("λ study: accuracy vs compute")
    ax.grid(alpha=0.3)
    save_figure(layout.pareto(spec.study, "png"), fig)
    plt.close(fig)
