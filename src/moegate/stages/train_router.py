"""Stage train_router: train the DACT router and write ``router/``.

In: ``dataset/`` (tokenized splits with the retrieval teacher, labels.json), the encoder — the
pretrained ``backbone.model`` with its cached per-layer states ``states/`` (``router.encoder_mode``
frozen or lpft) or the fine-tuned ``backbone/`` (finetune) — and the tuned values in
``tuning/{backbone,submodels,training,lambda}.json``.
Out: ``router/`` through :func:`moegate.router.save_router`: config.json (backbone config, labels,
head config, λ, exit rule, max length, training metadata, tuned values and study names),
model.safetensors, the tokenizer, README.md and ``training.json`` (per-epoch curves, the λ sweep), and
the abstain score with its threshold, calibrated on the validation questions (:func:`calibrate_abstain`;
``kb_index.safetensors``, the KB windows' last-layer states, for ``kb_similarity``).

Loss = NLL(log a_N) + λ · mean Σ_n p_n + β · mean_n NLL(log y_n) + w · [KL(t ‖ a_N) + β · mean_n KL(t ‖ y_n)]
(:meth:`DactRouterModel.loss`; β = ``router.layer_loss_weight``, w = ``router.teacher_weight``, t = the
retrieval teacher); early stopping watches the validation value of the DACT part, NLL(log a_N) +
λ · ponder, which is what the router is. Every epoch also records validation accuracy with the real
per-sample early exit, at full depth, and the mean number of layers the early exit ran. λ comes from
the λ study, or, when it did not run, from a sweep of ``router.ponder_cost_grid`` on val (:func:`sweep_lambda`).

After an expert was added or removed, the router starts from the previous one (``router.warm_start``,
:mod:`moegate.warm_start`): its weights carried over, classifier rows matched by expert name; unless
``tuning.rerun_on_dataset_change``, λ stays the previous router's (no sweep). Every router written is
also kept as ``results/cache/router/`` (hard links), the next warm start's source.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moegate.encoder import device as pick_device
from moegate.io import read_json
from moegate.layout import Layout
from moegate.models.dact import DactRouterModel, HeadConfig, exit_from_output
from moegate.studies import NAMES
from moegate.training import (
    Checkpoint,
    LoopSettings,
    TokenSplit,
    check_tokens,
    count_parameters,
    file_digest,
    fingerprint,
    load_tokens,
    read_labels,
    seed_everything,
    to_device,
    train,
    trial_reporter,
)
from moegate.tuned import apply_tuned
from moegate.warm_start import WarmStart, carry_over, choose, snapshot

log = logging.getLogger(__name__)

TUNED_STUDIES = NAMES  # every study, in order: the router starts from all their chosen values


def validation_metrics(model: DactRouterModel, split: TokenSplit, ponder_cost: float, batch_size: int,
                       device: torch.device) -> dict[str, float]:
    """One pass over ``split``: mean loss terms, accuracy at full depth and with the real early exit.

    Out: val_loss (NLL + λ·ponder), val_nll, val_ponder (mean Σ p_n), val_accuracy (early exit),
    val_accuracy_full_depth, val_mean_layers (mean exit layer of the early exit), val_agreement
    (share of rows where early exit and full depth pick the same expert; 1.0 by the exit rule).
    """
    model.eval()
    totals = dict.fromkeys(("loss", "nll", "ponder", "full", "early", "layers", "agree"), 0.0)
    with torch.no_grad():
        for batch in split.batches(batch_size):
            batch = to_device(batch, device)
            labels = batch["labels"]
            if "states" in batch:  # cached states: the exit read off the all-layer output is the real one
                out = model.forward_states(batch["states"])
                probs, exit_layer = exit_from_output(out)
            else:
                out = model(batch["input_ids"], batch["attention_mask"])
                probs, exit_layer = model.early_exit(batch["input_ids"], batch["attention_mask"])
            total, nll, ponder = model.loss(out, labels, ponder_cost)
            full, early = out.log_a.argmax(-1), probs.argmax(-1)
            rows = len(labels)
            totals["loss"] += total.item() * rows
            totals["nll"] += nll.item() * rows
            totals["ponder"] += ponder.item() * rows
            totals["full"] += (full == labels).sum().item()
            totals["early"] += (early == labels).sum().item()
            totals["layers"] += exit_layer.sum().item()
            totals["agree"] += (early == full).sum().item()
    n = len(split)
    return {"val_loss": totals["loss"] / n, "val_nll": totals["nll"] / n, "val_ponder": totals["ponder"] / n,
            "val_accuracy": totals["early"] / n, "val_accuracy_full_depth": totals["full"] / n,
            "val_mean_layers": totals["layers"] / n, "val_agreement": totals["agree"] / n}


def calibrate_abstain(config: dict, model: DactRouterModel, labels: list[str], device: torch.device,
                      cached: dict | None = None):
    """How the router abstains: (the abstain block of config.json, the KBIndex kb_similarity compares with).

    The reference rows are the training split's KB windows (every training row when the dataset has no
    windows, e.g. a labelled CSV), as the router's own last-layer pooled states; the in-domain rows are
    the validation split's questions, whose contexts' windows the dataset stage kept out of training, so
    their similarity is not flattered. threshold = :func:`moegate.abstain.threshold_for_rate` of their
    scores at ``router.abstain.max_in_domain_rate`` (null rate: no threshold). ``cached``: the frozen
    encoder's StateSplits of train and val (else the states are computed with ``model``).
    """
    from moegate.abstain import abstain_rate, kb_index_from_states, kb_similarity, threshold_for_rate
    from moegate.stages.states import StateSplit, compute_states

    layout = Layout.from_config(config)
    section = config["router"]["abstain"]
    score, rate, top_k = section["score"], section["max_in_domain_rate"], int(section["top_k"])
    kinds = {s: pd.read_parquet(layout.split(s), columns=["kind"])["kind"].to_numpy() for s in ("train", "val")}

    def states_of(split: str, rows) -> StateSplit:
        rows = torch.as_tensor(rows, dtype=torch.bool)
        if cached is not None:
            part = cached[split]
            return StateSplit(part.states[:, rows], part.labels[rows])
        tokens = load_tokens(layout.tokens(split))
        sub = TokenSplit(tokens.input_ids[rows], tokens.attention_mask[rows], tokens.labels[rows], source=tokens.source)
        return StateSplit(compute_states(model, sub, device, desc=f"abstain states {split}"), sub.labels)

    questions = kinds["val"] == "question"
    if not questions.any():
        raise ValueError(f"{layout.split('val')}: no question rows to calibrate the abstain threshold on")
    val = states_of("val", questions)
    index = None
    if score == "kb_similarity":
        windows = kinds["train"] == "window"
        reference = "train KB windows" if windows.any() else "train questions (the dataset has no KB windows)"
        rows = windows if windows.any() else np.ones(len(kinds["train"]), dtype=bool)
        train = states_of("train", rows)
        index = kb_index_from_states(train.states[-1], train.labels, labels,
                                     [f"train:{i}" for i in np.flatnonzero(rows)])
        values = kb_similarity(index, val.states[-1], top_k)
    else:
        model.eval()
        with torch.no_grad():
            probs, _ = exit_from_output(model.forward_states(val.states.to(device)))
        values = probs.max(1).values.float().cpu().numpy()
    fixed = config["router"].get("abstain_below")  # the deprecated fixed threshold, when a config still sets it
    if fixed is not None:
        log.warning("router.abstain_below = %s is deprecated: a fixed threshold on %s instead of the calibrated one",
                    fixed, score)
    threshold = fixed if fixed is not None else None if rate is None else threshold_for_rate(values, rate)
    abstain = {"score": score, "threshold": threshold, "max_in_domain_rate": None if fixed is not None else rate,
               "calibration": {"split": "val", "questions": int(len(values)),
                               "abstain_rate": abstain_rate(values, threshold),
                               "score_quantiles": {q: float(np.quantile(values, float(q)))
                                                   for q in ("0.01", "0.05", "0.5")}}}
    if index is not None:
        abstain.update(top_k=top_k, kb_reference=reference)
    log.info("router abstains on %s < %s (%.1f %% of %d validation questions)", score,
             "never" if threshold is None else f"{threshold:.4f}", 100 * abstain["calibration"]["abstain_rate"],
             len(values))
    return abstain, index


def training_params(config: dict) -> dict:
    """The router's training hyperparameters as run (config ``router`` without the head), plus seed."""
    section = {k: v for k, v in config["router"].items() if k not in ("head", "abstain", "abstain_below")}
    return {**section, "seed": config["seed"]}


def build_model(config: dict, labels: list[str]) -> tuple[DactRouterModel, str]:
    """The untrained router and the path its tokenizer comes from: the pretrained ``backbone.model``
    for frozen and lpft (the encoder's own geometry), the fine-tuned ``backbone/`` for finetune."""
    from transformers import AutoModel

    from moegate.encoder import resolve_model

    layout = Layout.from_config(config)
    section = config["router"]
    if section["encoder_mode"] == "finetune":
        backbone_labels = read_json(layout.backbone / "labels.json")["labels"]
        if backbone_labels != labels:
            raise ValueError(f"{layout.backbone / 'labels.json'}: labels {backbone_labels} differ from "
                             f"{layout.labels} {labels}; retrain the backbone on this dataset")
        source = str(layout.backbone)
    else:
        source = resolve_model(config["backbone"]["model"])
    encoder = AutoModel.from_pretrained(source)
    seed_everything(int(config["seed"]))  # the DACT units' initial weights
    return DactRouterModel(encoder, len(labels), HeadConfig(**section["head"])), source


def init_kb_last_layer(config: dict, layout: Layout, model: DactRouterModel, labels: list[str],
                       only: list[int] | None = None) -> None:
    """``router.head.last_layer: kb``: the last layer's prototypes from the KB index the dataset stage wrote
    (every KB chunk's embedding, ``dataset/kb_index.safetensors``); nothing for ``trained``. ``only``: just
    these experts' (a warm start adding experts)."""
    if model.head_config.last_layer != "kb":
        return
    from moegate.config import ConfigError
    from moegate.retrieval import KBIndex

    path = layout.kb_index
    if not path.is_file():
        raise ConfigError(f"router.head.last_layer: kb needs {path}, the KB index the dataset stage builds from the "
                          "KB stages' chunks (a dataset from dataset.labelled_csv has none); use last_layer: trained")
    index = KBIndex.load(path)
    if index.labels != list(labels):
        raise ValueError(f"{path}: experts {index.labels} do not match the dataset's {list(labels)}")
    if index.encoder != config["backbone"]["model"]:
        raise ConfigError(f"router.head.last_layer: kb needs the router's encoder (backbone.model = "
                          f"{config['backbone']['model']!r}) to be the KB index's ({index.encoder!r}, encoder.model)")
    model.init_kb_prototypes(index.vectors, index.expert, seed=int(config["seed"]), only=only)
    log.info("router: last layer's prototypes from %d KB chunks (%s)", len(index), path)


def _set_encoder_trainable(model: DactRouterModel, trainable: bool) -> None:
    for p in model.encoder.parameters():
        p.requires_grad_(trainable)


def fit(config: dict, out_dir: str | Path | None = None, trial=None,
        checkpoint_dir: str | Path | None = None, tuned: dict | None = None, extra: dict | None = None,
        warm: WarmStart | None = None, warm_record: dict | None = None) -> dict:
    """Train the DACT router with ``config["router"]`` (already overlaid with tuned values).

    ``router.encoder_mode``: frozen = the pretrained encoder stays as it is and the DACT units train on
    its cached states (``states/``, the probe: seconds an epoch); finetune = start from the fine-tuned
    backbone and train everything on tokens; lpft = the probe first, then everything on tokens at the
    encoder's (low) ``router.learning_rate`` (LP-FT, Kumar et al. 2022: a trained head first keeps
    fine-tuning from distorting the pretrained features).

    ``out_dir``: write the router directory there (save_router). ``trial``: an optuna.Trial; the
    early-exit validation accuracy is reported each epoch (single-objective studies) and the trial may
    be pruned. ``checkpoint_dir``: resume the token training from / write a checkpoint there each epoch
    (deleted once out_dir is written). ``tuned``: {study: tuning json}, recorded in the metadata.
    ``warm``: a previous router to start from (:mod:`moegate.warm_start`; frozen only): its weights
    carried over, classifier rows matched by expert name, a new expert's prototypes from its own rows;
    ``warm_record``: the decision, recorded in the metadata (``warm_start``).
    Returns {val_accuracy, val_accuracy_full_depth, val_mean_layers, val_nll, val_loss, epochs, curves}
    of the restored best epoch (accuracy and layers measured with the real early exit).
    """
    from transformers import AutoTokenizer

    from moegate.stages.states import load_states, prototype_rows

    t0 = time.perf_counter()
    layout = Layout.from_config(config)
    section = config["router"]
    mode = section["encoder_mode"]
    ponder_cost = float(section["ponder_cost"])
    layer_weight = float(section["layer_loss_weight"])
    teacher_weight = float(section["teacher_weight"])
    label_weight = float(section["label_weight"])
    labels = read_labels(layout)
    device = pick_device(config["device"])
    if section["head"].get("last_layer") == "kb" and mode != "frozen":  # before any work, for every mode
        from moegate.config import ConfigError

        raise ConfigError(f"router.head.last_layer: kb keeps the pretrained encoder's geometry, so it needs "
                          f"router.encoder_mode: frozen (got {mode!r})")
    model, source = build_model(config, labels)
    vocab = model.encoder.config.vocab_size
    carried = carry_over(model, warm, labels) if warm is not None else None

    def loss_of(m: DactRouterModel, out, batch: dict) -> torch.Tensor:
        total, _, _ = m.loss(out, batch["labels"], ponder_cost, layer_loss_weight=layer_weight,
                             teacher=batch.get("teacher"), teacher_weight=teacher_weight,
                             label_weight=label_weight)
        return total

    hook = trial_reporter(trial, "val_accuracy") if trial is not None else None
    results, sizes, checkpoint = [], {}, None
    if mode in ("frozen", "lpft"):
        states = {s: load_states(config, s) for s in ("train", "val")}
        sizes = {s: len(d) for s, d in states.items()}
        if model.head_config.classifier == "prototypes" and carried is None:
            model.init_prototypes(*prototype_rows(states["train"]), seed=int(config["seed"]))
            init_kb_last_layer(config, layout, model, labels)
        elif model.head_config.classifier == "prototypes" and carried["new_index"]:  # old centres stay
            model.init_prototypes(*prototype_rows(states["train"]), seed=int(config["seed"]),
                                  experts=carried["new_index"], recenter=False)
            init_kb_last_layer(config, layout, model, labels, only=carried["new_index"])
        model.to(device)
        _set_encoder_trainable(model, False)
        probe = LoopSettings.from_section(section["probe"], config["seed"])
        result = train(model, states["train"], lambda m, b: loss_of(m, m.forward_states(b["states"]), b),
                       lambda m: validation_metrics(m, states["val"], ponder_cost, probe.batch_size, device),
                       probe, device, None, hook if mode == "frozen" else None, desc="router probe")
        results.append(("probe", result))
    if mode in ("finetune", "lpft"):
        data = {s: load_tokens(layout.tokens(s)) for s in ("train", "val")}
        sizes = {s: len(d) for s, d in data.items()}
        for split in data.values():
            check_tokens(split, len(labels), vocab, source)
        if mode == "finetune" and model.head_config.classifier == "prototypes":
            from moegate.stages.states import StateSplit, compute_states

            kinds = pd.read_parquet(layout.split("train"), columns=["kind"])["kind"]
            pooled = compute_states(model, data["train"], torch.device("cpu"), desc="prototype states")
            model.init_prototypes(*prototype_rows(StateSplit(pooled, data["train"].labels,
                                                             window=torch.tensor((kinds == "window").to_numpy()))),
                                  seed=int(config["seed"]))
        model.to(device)
        _set_encoder_trainable(model, True)
        settings = LoopSettings.from_section(section, config["seed"])
        if checkpoint_dir is not None:
            checkpoint = Checkpoint(checkpoint_dir, fingerprint({
                "stage": "router", "router": section, "seed": config["seed"], "labels": labels,
                "encoder": file_digest(Path(source) / "model.safetensors")
                if (Path(source) / "model.safetensors").is_file() else source,
                "data": {s: file_digest(layout.tokens(s)) for s in data}}))
        result = train(model, data["train"], lambda m, b: loss_of(m, m(b["input_ids"], b["attention_mask"]), b),
                       lambda m: validation_metrics(m, data["val"], ponder_cost, settings.batch_size, device),
                       settings, device, checkpoint, hook, desc="router")
        results.append(("finetune", result))

    result = results[-1][1]
    best = result.best
    summary = {k: best[k] for k in ("val_accuracy", "val_accuracy_full_depth", "val_mean_layers", "val_nll",
                                    "val_loss")}
    curves = [{**row, "stage": stage} for stage, r in results for row in r.curves]
    summary.update(epochs=sum(r.epochs_run for _, r in results), curves=curves)
    if out_dir is not None:
        from moegate.router import save_router

        tuned = tuned or {}
        wall = round(time.perf_counter() - t0, 3)
        train_seconds = round(sum(r.train_seconds for _, r in results), 3)
        metadata = {
            "backbone_model": config["backbone"]["model"],
            "encoder_mode": mode,
            "encoder_source": source,
            "training": {**training_params(config), "device": str(device)},
            "ponder_cost": ponder_cost,
            "tuned": {s: t.get("params", {}) for s, t in tuned.items()},
            "studies": {s: t.get("study") for s, t in tuned.items()},
            "dataset": sizes,
            "best_epoch": result.best_epoch, "epochs_run": summary["epochs"],
            "stopped_early": result.stopped_early,
            "val": {k.removeprefix("val_"): v for k, v in best.items() if k.startswith("val_")},
            "parameters": count_parameters(model),
            "train_seconds": train_seconds, "wall_seconds": wall,
            "warm_start": {**(warm_record or {"used": False}),
                           **({k: v for k, v in carried.items() if k != "new_index"} if carried else {})},
        }
        training = {"curves": curves, "best_epoch": result.best_epoch, "epochs_run": summary["epochs"],
                    "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
                    "train_seconds": train_seconds, "wall_seconds": wall, **(extra or {})}
        abstain, kb_index = calibrate_abstain(config, model, labels, device,
                                              cached=states if mode == "frozen" else None)
        _set_encoder_trainable(model, True)
        save_router(out_dir, model, AutoTokenizer.from_pretrained(source), labels,
                    max_length=config["dataset"]["max_length"], ponder_cost=ponder_cost, metadata=metadata,
                    extra_json={"training.json": training}, abstain=abstain, kb_index=kb_index)
        log.info("router (%s encoder): val accuracy %.4f (full depth %.4f), mean exit layer %.2f of %d; wrote %s",
                 mode, summary["val_accuracy"], summary["val_accuracy_full_depth"], summary["val_mean_layers"],
                 model.num_layers, out_dir)
        if checkpoint:
            checkpoint.delete()
    return summary


def sweep_lambda(config: dict, warm: WarmStart | None = None) -> dict:
    """Choose λ (``router.ponder_cost``) on the validation split when no λ study chose one: fit a router
    for each value of ``router.ponder_cost_grid`` and apply the λ study's rule (fewest mean layers within
    ``tuning.lambda.accuracy_tolerance`` of the best accuracy). Cheap with a frozen encoder.

    Out: {grid, rows: [{ponder_cost, val_accuracy, val_mean_layers, ...}], chosen, rule}.
    """
    from moegate.studies import choose_lambda, pareto_front

    rows = []
    for i, value in enumerate(config["router"]["ponder_cost_grid"]):
        trial = copy.deepcopy(config)
        trial["router"]["ponder_cost"] = float(value)
        result = fit(trial, warm=warm)
        rows.append({"trial": i, "ponder_cost": float(value),
                     **{k: result[k] for k in ("val_accuracy", "val_mean_layers", "val_accuracy_full_depth",
                                              "val_nll")}})
        log.info("λ sweep: λ=%g → val accuracy %.4f, %.2f layers", value, result["val_accuracy"],
                 result["val_mean_layers"])
    tolerance = config["tuning"]["lambda"]["accuracy_tolerance"]
    chosen = choose_lambda(rows, tolerance)
    front = pareto_front([(r["val_accuracy"], r["val_mean_layers"]) for r in rows])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return {"grid": list(config["router"]["ponder_cost_grid"]), "rows": rows, "chosen": chosen,
            "accuracy_tolerance": tolerance,
            "rule": "fewest val_mean_layers among values within accuracy_tolerance of the best val_accuracy"}


def train_router(config: dict) -> dict:
    """The rule: overlay every tuned study (or sweep λ on val), warm-start from the previous router when
    the expert set changed (:func:`moegate.warm_start.choose`), train with a resumable checkpoint, write
    ``router/`` and keep a snapshot of it for the next warm start."""
    layout = Layout.from_config(config)
    config, used = apply_tuned(config, TUNED_STUDIES)
    if used:
        log.info("router: tuned values %s", {s: t.get("params") for s, t in used.items()})
    warm, warm_record = choose(config, read_labels(layout))
    log.info("router: %s", f"warm start from {warm.path}" if warm else f"from nothing ({warm_record['why']})")
    extra = None
    keep_previous = (warm is not None and warm.ponder_cost is not None
                     and not config["tuning"]["rerun_on_dataset_change"])
    if not used.get("lambda", {}).get("params") and keep_previous:
        # the sweep is λ's tuning: like the studies, it reruns on a new expert set only when asked to
        config["router"]["ponder_cost"] = float(warm.ponder_cost)
        extra = {"ponder_cost_from": "previous router (tuning.rerun_on_dataset_change is false)"}
        log.info("router: λ=%g from the previous router", warm.ponder_cost)
    elif not used.get("lambda", {}).get("params") and config["router"]["ponder_cost_grid"]:
        sweep = sweep_lambda(config, warm)  # λ is never a blind default: with no λ study, a sweep on val picks it
        config["router"]["ponder_cost"] = sweep["chosen"]["ponder_cost"]
        extra = {"lambda_sweep": sweep}
        log.info("router: λ sweep chose λ=%g (val accuracy %.4f, %.2f layers)", sweep["chosen"]["ponder_cost"],
                 sweep["chosen"]["val_accuracy"], sweep["chosen"]["val_mean_layers"])
    summary = fit(config, out_dir=layout.router, checkpoint_dir=layout.checkpoints / "router", tuned=used,
                  extra=extra, warm=warm, warm_record=warm_record)
    snapshot(layout.router, layout.previous_router)
    return summary
