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
from moegate.io import atomic_dir, read_json, write_json
from moegate.layout import Layout
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

HEAD_FILE = "classifier.safetensors"


class ClassifierHead(nn.Module):
    """ReLU → Dropout → Linear: [CLS] hidden state (B, H) → expert logits (B, K)."""

    def __init__(self, hidden_size: int, num_experts: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_experts)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(torch.relu(cls)))


class BackboneClassifier(nn.Module):
    """A Hugging Face encoder with a :class:`ClassifierHead` on its first ([CLS]) token."""

    def __init__(self, encoder: nn.Module, head: ClassifierHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


def classify(model: BackboneClassifier, split: TokenSplit, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (rows, K) for every row of ``split``, in order, in eval mode."""
    model.eval()
    out = []
    with torch.inference_mode():
        for batch in split.batches(batch_size):
            batch = to_device(batch, device)
            out.append(model(batch["input_ids"], batch["attention_mask"]).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, model.head.linear.out_features))


def split_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy loss and accuracy of logits against labels."""
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def read_labels(layout: Layout) -> list[str]:
    labels = read_json(layout.labels).get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{layout.labels}: expected {{\"labels\": [expert, ...]}} with at least 2 names")
    return labels


def check_tokens(split: TokenSplit, num_experts: int, vocab_size: int, model_name: str) -> None:
    """Fail early, naming the file, when a split does not fit this model and label set."""
    if len(split) == 0:
        raise ValueError(f"{split.source}: no rows")
    if int(split.input_ids.max()) >= vocab_size:
        raise ValueError(f"{split.source}: token id {int(split.input_ids.max())} outside the vocabulary of "
                         f"{model_name} ({vocab_size}); was the dataset tokenized with another backbone.model?")
    if int(split.labels.min()) < 0 or int(split.labels.max()) >= num_experts:
        raise ValueError(f"{split.source}: labels must lie in 0..{num_experts - 1} (labels.json)")


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


def save_backbone(out_dir: str | Path, model: BackboneClassifier, tokenizer, labels: list[str],
                  metrics: dict) -> None:
    """Write the backbone directory atomically: encoder, tokenizer, head, labels.json, metrics.json."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        model.encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt", "dropout": str(model.head.dropout.p)})
        write_json(tmp / "labels.json", {"labels": labels})
        write_json(tmp / "metrics.json", metrics)


def load_backbone_classifier(directory: str | Path):
    """(encoder, head, tokenizer, labels) from a ``backbone/`` directory, in eval mode on the CPU."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    directory = Path(directory)
    for name in ("config.json", "model.safetensors", HEAD_FILE, "labels.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing from the backbone directory "
                                    "(did train_backbone finish?)")
    labels = read_json(directory / "labels.json")["labels"]
    encoder = AutoModel.from_pretrained(directory).eval()
    tensors = load_file(str(directory / HEAD_FILE))
    weight = tensors.get("linear.weight")
    if weight is None or weight.shape != (len(labels), encoder.config.hidden_size):
        raise ValueError(f"{directory / HEAD_FILE}: expected linear.weight of shape "
                         f"({len(labels)}, {encoder.config.hidden_size}) for labels.json and the encoder, got "
                         f"{None if weight is None else tuple(weight.shape)}")
    head = ClassifierHead(encoder.config.hidden_size, len(labels))
    head.load_state_dict(tensors)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return encoder, head.eval(), tokenizer, labels


def train_backbone(config: dict) -> dict:
    """The rule: overlay tuning/backbone.json, train with a resumable checkpoint, write ``backbone/``."""
    layout = Layout.from_config(config)
    config, used = apply_tuned(config, ("backbone",))
    if used:
        log.info("backbone: tuned values %s", {s: t.get("params") for s, t in used.items()})
    return fit(config, out_dir=layout.backbone, checkpoint_dir=layout.checkpoints / "backbone", tuned=used)
