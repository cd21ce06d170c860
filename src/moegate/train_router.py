"""Stage train_router: train the DACT router from the fine-tuned backbone and write ``router/``.

In: ``dataset/`` (tokenized splits, labels.json), ``backbone/`` (the fine-tuned encoder and its
tokenizer) and the tuned values in ``tuning/{backbone,submodels,training,lambda}.json``.
Out: ``router/`` through :func:`moegate.router.save_router`: config.json (backbone config, labels,
head config, λ, exit rule, max length, training metadata, tuned values and study names),
model.safetensors, the tokenizer, README.md and ``training.json`` (per-epoch curves).

Loss = NLL(log a_N) + λ · mean Σ_n p_n + β · mean_n NLL(log y_n) (:meth:`DactRouterModel.loss`,
β = ``router.layer_loss_weight``); early stopping watches the validation value of the DACT part,
NLL(log a_N) + λ · ponder, which is what the router is. Every epoch also records validation
accuracy with the real per-sample early exit, at full depth, and the mean number of layers the
early exit ran.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from moegate.dact import DactRouterModel, HeadConfig
from moegate.encoder import device as pick_device
from moegate.io import read_json
from moegate.layout import Layout
from moegate.train_backbone import check_tokens, read_labels
from moegate.training import (
    Checkpoint,
    LoopSettings,
    TokenSplit,
    count_parameters,
    file_digest,
    fingerprint,
    load_tokens,
    seed_everything,
    to_device,
    train,
    trial_reporter,
)
from moegate.tuned import apply_tuned

log = logging.getLogger(__name__)

TUNED_STUDIES = ("backbone", "submodels", "training", "lambda")


def validation_metrics(model: DactRouterModel, split: TokenSplit, lambda_: float, batch_size: int,
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
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            rows = len(labels)
            out = model(ids, mask)
            total, nll, ponder = model.loss(out, labels, lambda_)
            full = out.log_a.argmax(-1)
            probs, exit_layer = model.early_exit(ids, mask)
            early = probs.argmax(-1)
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


def training_params(config: dict) -> dict:
    """The router's training hyperparameters as run (config ``router`` without the head), plus seed."""
    section = {k: v for k, v in config["router"].items() if k != "head"}
    return {**section, "seed": config["seed"]}


def fit(config: dict, out_dir: str | Path | None = None, trial=None,
        checkpoint_dir: str | Path | None = None, tuned: dict | None = None) -> dict:
    """Train the DACT router with ``config["router"]`` (already overlaid with tuned values).

    ``out_dir``: write the router directory there (save_router). ``trial``: an optuna.Trial; the
    early-exit validation accuracy is reported each epoch (single-objective studies) and the trial may
    be pruned. ``checkpoint_dir``: resume from / write a checkpoint there each epoch (deleted once
    out_dir is written). ``tuned``: {study: tuning json} from apply_tuned, recorded in the metadata.
    Returns {val_accuracy, val_accuracy_full_depth, val_mean_layers, val_nll, val_loss, epochs, curves}
    of the restored best epoch (accuracy and layers measured with the real early exit).
    """
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    layout = Layout.from_config(config)
    section = config["router"]
    lambda_ = float(section["lambda_"])
    layer_weight = float(section["layer_loss_weight"])
    labels = read_labels(layout)
    backbone_labels = read_json(layout.backbone / "labels.json")["labels"]
    if backbone_labels != labels:
        raise ValueError(f"{layout.backbone / 'labels.json'}: labels {backbone_labels} differ from "
                         f"{layout.labels} {labels}; retrain the backbone on this dataset")
    data = {s: load_tokens(layout.tokens(s)) for s in ("train", "val")}
    settings = LoopSettings.from_section(section, config["seed"])
    device = pick_device(config["device"])

    encoder = AutoModel.from_pretrained(layout.backbone)
    for split in data.values():
        check_tokens(split, len(labels), encoder.config.vocab_size, str(layout.backbone))
    seed_everything(settings.seed)  # the DACT units' initial weights
    head = HeadConfig(**section["head"])
    model = DactRouterModel(encoder, len(labels), head).to(device)

    def step(m: DactRouterModel, batch: dict) -> torch.Tensor:
        out = m(batch["input_ids"], batch["attention_mask"])
        total, _, _ = m.loss(out, batch["labels"], lambda_, layer_loss_weight=layer_weight)
        return total

    def validate(m: DactRouterModel) -> dict:
        return validation_metrics(m, data["val"], lambda_, settings.batch_size, device)

    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(checkpoint_dir, fingerprint({
            "stage": "router", "router": section, "seed": config["seed"], "labels": labels,
            "backbone": file_digest(layout.backbone / "model.safetensors"),
            "data": {s: file_digest(layout.tokens(s)) for s in data}}))
    hook = trial_reporter(trial, "val_accuracy") if trial is not None else None
    result = train(model, data["train"], step, validate, settings, device, checkpoint, hook, desc="router")

    best = result.best
    summary = {k: best[k] for k in ("val_accuracy", "val_accuracy_full_depth", "val_mean_layers", "val_nll",
                                    "val_loss")}
    summary.update(epochs=result.epochs_run, curves=result.curves)
    if out_dir is not None:
        from moegate.router import save_router

        tuned = tuned or {}
        wall = round(time.perf_counter() - t0, 3)
        metadata = {
            "backbone_model": config["backbone"]["model"],
            "training": {**training_params(config), "device": str(device)},
            "lambda_": lambda_,
            "tuned": {s: t.get("params", {}) for s, t in tuned.items()},
            "studies": {s: t.get("study") for s, t in tuned.items()},
            "dataset": {s: len(d) for s, d in data.items()},
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "val": {k.removeprefix("val_"): v for k, v in best.items() if k.startswith("val_")},
            "parameters": count_parameters(model),
            "train_seconds": round(result.train_seconds, 3), "wall_seconds": wall,
        }
        training = {"curves": result.curves, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                    "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
                    "train_seconds": round(result.train_seconds, 3), "wall_seconds": wall}
        save_router(out_dir, model, AutoTokenizer.from_pretrained(layout.backbone), labels,
                    max_length=config["dataset"]["max_length"], lambda_=lambda_, metadata=metadata,
                    extra_json={"training.json": training}, abstain_below=section["abstain_below"])
        log.info("router: val accuracy %.4f (full depth %.4f), mean exit layer %.2f of %d; wrote %s",
                 summary["val_accuracy"], summary["val_accuracy_full_depth"], summary["val_mean_layers"],
                 model.num_layers, out_dir)
        if checkpoint:
            checkpoint.delete()
    return summary


def train_router(config: dict) -> dict:
    """The rule: overlay every tuned study, train with a resumable checkpoint, write ``router/``."""
    layout = Layout.from_config(config)
    config, used = apply_tuned(config, TUNED_STUDIES)
    if used:
        log.info("router: tuned values %s", {s: t.get("params") for s, t in used.items()})
    return fit(config, out_dir=layout.router, checkpoint_dir=layout.checkpoints / "router", tuned=used)
