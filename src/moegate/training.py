"""The shared training loop of the backbone classifier, the DACT router and the tuning trials.

One loop, used three ways: AdamW (no weight decay on biases and LayerNorm weights), linear warm-up
then linear decay, gradient clipping, mixed precision on CUDA only (autocast + GradScaler), early
stopping on validation loss that restores the best weights, and an atomic checkpoint at the end of
every epoch so a job killed mid-training resumes from its last completed epoch.

What differs between the users is passed in as two functions: ``step(model, batch) -> loss`` (one
training batch) and ``validate(model) -> {"val_loss": ..., ...}`` (one pass over the validation set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moegate.config import defaults as config_defaults
from moegate.io import atomic_path, read_json

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


# -- data -------------------------------------------------------------------------------------------
@dataclass
class TokenSplit:
    """One tokenized split held in memory: ``input_ids`` and ``attention_mask`` (rows, max_length), ``labels`` (rows,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    source: str = "<memory>"
    teacher: torch.Tensor | None = None  # (rows, K) the retrieval teacher's distribution, when the dataset has one

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                drop_single: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches in order (or shuffled by ``generator``), every row once, padding trimmed.

        ``drop_single`` drops a trailing batch of one row (BatchNorm cannot train on it).
        """
        for idx in batch_indices(len(self), batch_size, generator, drop_single):
            batch = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                     "labels": self.labels[idx]}
            if self.teacher is not None:
                batch["teacher"] = self.teacher[idx]
            yield trim_padding(batch)

    def num_batches(self, batch_size: int, drop_single: bool = False) -> int:
        return num_batches(len(self), batch_size, drop_single)


def batch_indices(rows: int, batch_size: int, generator: torch.Generator | None = None,
                  drop_single: bool = False) -> list[torch.Tensor]:
    """Row indices of each batch: in order, or shuffled by ``generator``; every row once. ``drop_single``
    drops a trailing batch of one row (BatchNorm cannot train on it). Shared by every split type."""
    order = torch.randperm(rows, generator=generator) if generator is not None else torch.arange(rows)
    chunks = list(order.split(batch_size))
    if drop_single and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks


def num_batches(rows: int, batch_size: int, drop_single: bool = False) -> int:
    """How many batches :func:`batch_indices` gives."""
    n = math.ceil(rows / batch_size)
    if drop_single and n > 1 and rows % batch_size == 1:
        n -= 1
    return n


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing columns that are padding in every row (exact for right-padded inputs; saves compute)."""
    mask = batch["attention_mask"]
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    if length == mask.shape[1]:
        return batch
    out = dict(batch)
    out["input_ids"] = batch["input_ids"][:, :length]
    out["attention_mask"] = mask[:, :length]
    return out


def load_tokens(path: str | Path) -> TokenSplit:
    """Read ``dataset/tokenized/{split}.safetensors`` (input_ids, attention_mask, labels: int64; teacher
    (rows, K) float32 when the dataset stage wrote one)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing tokenized split (did the dataset stage run?)")
    tensors = load_file(str(path))
    missing = [k for k in TOKEN_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; expected {list(TOKEN_KEYS)}")
    ids, mask, labels = (tensors[k].long() for k in TOKEN_KEYS)
    if ids.ndim != 2 or ids.shape != mask.shape or labels.shape != (ids.shape[0],):
        raise ValueError(f"{path}: expected input_ids/attention_mask [rows, max_length] and labels [rows], got "
                         f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(labels.shape)}")
    teacher = tensors.get("teacher")
    if teacher is not None and (teacher.ndim != 2 or teacher.shape[0] != ids.shape[0]):
        raise ValueError(f"{path}: teacher must be [rows, experts], got {tuple(teacher.shape)}")
    return TokenSplit(ids, mask, labels, source=str(path), teacher=None if teacher is None else teacher.float())


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the tokenized splits are a few MB): part of a checkpoint's fingerprint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able description of a training run (config values + data digests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- settings, seeding, optimizer -------------------------------------------------------------------
_LOOP = config_defaults("backbone")


@dataclass
class LoopSettings:
    """The training hyperparameters one run uses (config ``backbone`` / ``router`` / ``router.probe``
    sections, through :meth:`from_section`). The defaults are the schema's ``backbone`` section: that
    section has no head_learning_rate, so None (= learning_rate)."""

    learning_rate: float = float(_LOOP["learning_rate"])
    weight_decay: float = float(_LOOP["weight_decay"])
    batch_size: int = int(_LOOP["batch_size"])
    epochs: int = int(_LOOP["epochs"])
    warmup_ratio: float = float(_LOOP["warmup_ratio"])
    max_grad_norm: float = float(_LOOP["max_grad_norm"])
    patience: int = int(_LOOP["patience"])  # epochs without a lower validation loss before stopping
    head_learning_rate: float | None = None  # parameters outside ``model.encoder`` (None = learning_rate)
    seed: int = int(config_defaults("seed"))

    @classmethod
    def from_section(cls, section: dict, seed: int) -> LoopSettings:
        """The loop's keys of a config section (others, e.g. ``model``, ``head``, are ignored), typed."""
        defaults = cls()
        values = {}
        for name in cls.__dataclass_fields__:
            if name == "seed" or name not in section:
                continue
            kind = float if name == "head_learning_rate" else type(getattr(defaults, name))
            if section[name] is None and name == "head_learning_rate":
                continue
            try:
                values[name] = kind(section[name])
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected {kind.__name__}, got {section[name]!r}") from None
        return cls(seed=int(seed), **values)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_groups(model: torch.nn.Module, weight_decay: float, learning_rate: float,
                     head_learning_rate: float | None = None) -> list[dict]:
    """AdamW groups: decay on weight matrices only, none on biases and normalisation weights.

    Parameters under ``model.encoder`` (the pretrained backbone) train at ``learning_rate``; the rest
    (heads trained from scratch) at ``head_learning_rate`` when given. Empty groups are left out.
    """
    norm_types = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.GroupNorm)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, norm_types) or "layernorm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    head_lr = learning_rate if head_learning_rate is None else head_learning_rate
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if name.endswith("bias") or id(p) in no_decay_ids or p.ndim < 2 else weight_decay
        lr = learning_rate if name.startswith("encoder.") else head_lr
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LR factor rising linearly 0→1 over warm-up, then falling linearly to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device):
    """fp16 autocast on CUDA; a no-op elsewhere (CPU training stays in fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -- RNG state (checkpointable with weights_only=True: tensors and plain Python only) ---------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints --------------------------------------------------------------------------------------
class Checkpoint:
    """The resume state of one training job: ``directory/checkpoint.pt``, replaced atomically each epoch.

    ``fingerprint`` names the config and data the state belongs to; a checkpoint with another
    fingerprint is ignored (and overwritten), so a changed config never resumes stale weights.
    """

    def __init__(self, directory: str | Path, fingerprint: str):
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_FILE
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:  # pickle errors surface as RuntimeError
            log.warning("%s: unreadable checkpoint (%s); starting fresh", self.path, e)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.info("%s: checkpoint is for another config or dataset (fingerprint %s, this run %s); "
                     "starting fresh", self.path, state.get("fingerprint"), self.fingerprint)
            return None
        return state

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        for partial in self.directory.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # a save a killed attempt left half-written
            partial.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty; other files are not ours
            self.directory.rmdir()


# -- the loop -----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a finished loop hands back: per-epoch curves and the restored best epoch's metrics."""

    curves: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best: dict = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False
    resumed_from: int = 0       # epochs already done when this process started (0 = fresh)
    train_seconds: float = 0.0  # across all processes of a resumed run

    def to_dict(self) -> dict:
        return asdict(self)


StepFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ValidateFn = Callable[[torch.nn.Module], dict[str, float]]
EpochHook = Callable[[int, dict[str, float]], None]


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(model: torch.nn.Module, train_data: TokenSplit, step: StepFn, validate: ValidateFn,
          settings: LoopSettings, device: torch.device, checkpoint: Checkpoint | None = None,
          on_epoch_end: EpochHook | None = None, desc: str = "train") -> TrainResult:
    """Train ``model`` (already on ``device``) and leave it holding the best weights by validation loss.

    ``step(model, batch)`` returns the scalar training loss of one batch (the batch is on ``device``);
    ``validate(model)`` returns a dict with at least ``val_loss`` (model in eval mode, no grad).
    ``on_epoch_end(epoch, row)`` runs after the epoch's checkpoint is written (a tuning trial reports
    there and may raise ``optuna.TrialPruned``). Returns the curves and the best epoch's metrics.
    """
    seed_everything(settings.seed)
    groups = parameter_groups(model, settings.weight_decay, settings.learning_rate, settings.head_learning_rate)
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    drop_single = True  # a lone trailing row breaks BatchNorm heads and adds nothing
    steps_per_epoch = train_data.num_batches(settings.batch_size, drop_single)
    total = steps_per_epoch * settings.epochs
    scheduler = linear_warmup_decay(optimizer, math.ceil(settings.warmup_ratio * total), total)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    result = TrainResult()
    best_loss, best_state, bad_epochs, start = math.inf, None, 0, 0
    state = checkpoint.load() if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        best_loss, best_state, bad_epochs = state["best_loss"], state["best_model"], state["bad_epochs"]
        result.curves, result.best_epoch, result.best = state["curves"], state["best_epoch"], state["best"]
        result.train_seconds, start = state["train_seconds"], state["epoch"]
        result.resumed_from = start
        set_rng_state(state["rng"])
        log.info("%s: resuming after epoch %d of %d from %s", desc, start, settings.epochs, checkpoint.path)
        if state.get("stopped_early"):
            start = settings.epochs  # it had already stopped; only the final output was missing
            result.stopped_early = True

    for epoch in range(start + 1, settings.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)  # same order after resume
        losses = []
        bar = tqdm(train_data.batches(settings.batch_size, generator, drop_single), total=steps_per_epoch,
                   desc=f"{desc} epoch {epoch}/{settings.epochs}", leave=False, disable=None)
        for batch in bar:
            batch = to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                loss = step(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc} epoch {epoch}: training loss is {loss.item()} "
                                         f"(learning_rate {settings.learning_rate} too high?)")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()

        model.eval()
        with torch.no_grad():
            metrics = validate(model)
        if "val_loss" not in metrics:
            raise KeyError(f"{desc}: validate() must return 'val_loss', got {sorted(metrics)}")
        seconds = time.perf_counter() - t0
        result.train_seconds += seconds
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan,
               "learning_rate": scheduler.get_last_lr()[0], "seconds": round(seconds, 3),
               **{k: float(v) for k, v in metrics.items()}}
        result.curves.append(row)
        log.info("%s epoch %d/%d: %s", desc, epoch, settings.epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))

        if row["val_loss"] < best_loss:
            best_loss, best_state, bad_epochs = row["val_loss"], _cpu_state(model), 0
            result.best_epoch, result.best = epoch, dict(row)
        else:
            bad_epochs += 1
        result.stopped_early = bad_epochs >= settings.patience and epoch < settings.epochs

        if checkpoint:
            checkpoint.save({
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best_loss": best_loss,
                "best_model": best_state, "bad_epochs": bad_epochs, "best_epoch": result.best_epoch,
                "best": result.best, "curves": result.curves, "train_seconds": result.train_seconds,
                "stopped_early": result.stopped_early, "rng": rng_state(),
            })
        if on_epoch_end:
            on_epoch_end(epoch, row)
        if result.stopped_early:
            log.info("%s: validation loss has not improved for %d epochs; stopping after epoch %d",
                     desc, bad_epochs, epoch)
            break

    result.epochs_run = len(result.curves)
    if best_state is not None:
        model.load_state_dict(best_state)
        log.info("%s: restored the best weights (epoch %d, val_loss %.4f)", desc, result.best_epoch, best_loss)
    return result


def trial_reporter(trial, metric: str) -> EpochHook:
    """An ``on_epoch_end`` hook reporting ``row[metric]`` to an Optuna trial and pruning when it says so.

    Multi-objective studies (the λ study) cannot report intermediate values: the hook does nothing there.
    """
    import optuna

    def hook(epoch: int, row: dict) -> None:
        if len(trial.study.directions) > 1:
            return
        trial.report(row[metric], step=epoch - 1)  # pruners count steps from 0
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({metric}={row[metric]:.4f})")

    return hook


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the dataset a trainer reads ---------------------------------------------------------------------
def read_labels(layout) -> list[str]:
    """The experts, in label order, from the dataset's labels.json (``layout``: a moegate.layout.Layout)."""
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
