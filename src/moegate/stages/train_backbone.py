"""Stage train_backbone: fine-tune the encoder as a plain expert classifier (ReLU → Dropout → Linear on [CLS]).

Reads ``dataset/`` (tokenized splits + labels.json) and writes ``backbone/``: the encoder's
``save_pretrained`` files, its tokenizer, ``classifier.safetensors`` (the head), ``labels.json`` and
``metrics.json`` (per-epoch curves, test accuracy, parameters, wall time). The DACT router starts
from this encoder, and evaluate compares the router against this classifier.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from moegate.encoder import device as pick_device
from moegate.encoder import resolve_model
from moegate.layout import Layout
from moegate.models.backbone import BackboneClassifier, ClassifierHead, classify, save_backbone
from moegate.studies import trained_by
from moegate.training import (
    Checkpoint,
    LoopSettings,
    check_tokens,
    count_parameters,
    file_digest,
    fingerprint,
    load_tokens,
    read_labels,
    seed_everything,
    train,
    trial_reporter,
)
from moegate.tuned import apply_tuned

log = logging.getLogger(__name__)


def split_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy loss and accuracy of logits against labels."""
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def fit(config: dict, out_dir: str | Path | None = None, trial=None,
        checkpoint_dir: str | Path | None = None, tuned: dict | None = None) -> dict:
    """Train the backbone classifier with ``config["backbone"]`` (already overlaid with tuned values).

    ``out_dir``: also score the test split and write the backbone directory there.
    ``trial``: an optuna.Trial; val accuracy is reported each epoch and the trial may be pruned.
    ``checkpoint_dir``: resume from / write a checkpoint there each epoch (deleted once out_dir is written).
    ``tuned``: {study: tuning json} from apply_tuned, recorded in metrics.json.
    Returns {val_loss, val_accuracy, epochs, curves} of the restored best epoch.
    """
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    layout = Layout.from_config(config)
    section = config["backbone"]
    labels = read_labels(layout)
    data = {s: load_tokens(layout.tokens(s)) for s in ("train", "val")}
    settings = LoopSettings.from_section(section, config["seed"])
    device = pick_device(config["device"])

    path = resolve_model(section["model"])
    seed_everything(settings.seed)  # the head's initial weights
    encoder = AutoModel.from_pretrained(path)
    for split in data.values():
        check_tokens(split, len(labels), encoder.config.vocab_size, section["model"])
    head = ClassifierHead(encoder.config.hidden_size, len(labels), section["dropout"])
    model = BackboneClassifier(encoder, head).to(device)

    def step(m: BackboneClassifier, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validate(m: BackboneClassifier) -> dict:
        scores = split_metrics(classify(m, data["val"], settings.batch_size, device), data["val"].labels)
        return {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]}

    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(checkpoint_dir, fingerprint({
            "stage": "backbone", "backbone": section, "seed": config["seed"], "labels": labels,
            "data": {s: file_digest(layout.tokens(s)) for s in data}}))
    hook = trial_reporter(trial, "val_accuracy") if trial is not None else None
    result = train(model, data["train"], step, validate, settings, device, checkpoint, hook, desc="backbone")

    summary = {"val_loss": result.best["val_loss"], "val_accuracy": result.best["val_accuracy"],
               "epochs": result.epochs_run, "curves": result.curves}
    if out_dir is not None:
        test = load_tokens(layout.tokens("test"))
        check_tokens(test, len(labels), encoder.config.vocab_size, section["model"])
        scores = split_metrics(classify(model, test, settings.batch_size, device), test.labels)
        metrics = {
            "model": section["model"], "labels": labels,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from,
            "curves": result.curves,
            "val": {"loss": result.best["val_loss"], "accuracy": result.best["val_accuracy"]},
            "test": {**scores, "rows": len(test)},
            "dataset": {"train": len(data["train"]), "val": len(data["val"]), "test": len(test)},
            "params": {**section, "seed": config["seed"], "device": str(device)},
            "parameters": count_parameters(model),
            "tuned": {s: {"study": t.get("study"), "params": t.get("params", {})} for s, t in (tuned or {}).items()},
            "train_seconds": round(result.train_seconds, 3),
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
        save_backbone(out_dir, model, AutoTokenizer.from_pretrained(path), labels, metrics)
        log.info("backbone: test accuracy %.4f on %d rows; wrote %s", scores["accuracy"], len(test), out_dir)
        summary["test_accuracy"] = scores["accuracy"]
        if checkpoint:
            checkpoint.delete()
    return summary


def train_backbone(config: dict) -> dict:
    """The rule: overlay tuning/backbone.json, train with a resumable checkpoint, write ``backbone/``."""
    layout = Layout.from_config(config)
    config, used = apply_tuned(config, trained_by("backbone"))
    if used:
        log.info("backbone: tuned values %s", {s: t.get("params") for s, t in used.items()})
    return fit(config, out_dir=layout.backbone, checkpoint_dir=layout.checkpoints / "backbone", tuned=used)
