"""Stage states: the frozen encoder's per-layer pooled states of every dataset row, computed once.

With ``router.encoder_mode`` frozen (or lpft's first stage) the encoder never changes, so all it
contributes to training is each row's pooled state after every layer. This stage computes them once
with the router's own layer-by-layer code (:meth:`moegate.models.dact.DactRouterModel.states`), and the DACT
units then train on the cache: an epoch, and a tuning trial, cost seconds instead of encoder passes.

In:  ``dataset/tokenized/{split}.safetensors`` (input_ids, attention_mask, labels, teacher?),
     ``backbone.model`` (the pretrained encoder) and ``router.head.pooling``.
Out: ``states/{split}.safetensors``: ``states`` (N, rows, H) float32, ``labels`` (rows,), ``teacher``
     (rows, K) when the dataset has one, ``window`` (rows,) 1 for KB windows, ``row_key`` (rows, 16) the
     digest of each row's tokens; metadata: encoder (name and weights digest), pooling, and the digest of
     the tokens file it was computed from (a stale cache is refused on load). ``states/report.json``:
     rows per split, and how many rows' states were reused from the last run and how many computed.

Reuse: the last run's states files are kept (hard links) in ``results/cache/states/``
(:mod:`moegate.rowcache`); a row whose tokens they hold, under the same encoder and pooling, takes its
states from there, so after an expert is added only the new expert's rows go through the encoder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pandas as pd
import torch

from moegate import rowcache
from moegate.io import atomic_dir, atomic_path, write_json
from moegate.layout import Layout
from moegate.training import TokenSplit, batch_indices, file_digest, load_tokens, num_batches

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATE_DTYPE = torch.float32  # what the router computes, exactly: validation on the cache = the router on tokens
BATCH_SIZE = 128


@dataclass
class StateSplit:
    """One split's cached states in memory, with the TokenSplit batching interface the loop expects."""

    states: torch.Tensor  # (N, rows, H) float32
    labels: torch.Tensor  # (rows,) int64
    teacher: torch.Tensor | None = None  # (rows, K) float32
    window: torch.Tensor | None = None  # (rows,) bool: KB window rows
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                drop_single: bool = False):
        for idx in batch_indices(len(self), batch_size, generator, drop_single):
            batch = {"states": self.states[:, idx], "labels": self.labels[idx]}
            if self.teacher is not None:
                batch["teacher"] = self.teacher[idx]
            yield batch

    def num_batches(self, batch_size: int, drop_single: bool = False) -> int:
        return num_batches(len(self), batch_size, drop_single)


def frozen_encoder(config: dict):
    """The pretrained ``backbone.model`` (the frozen encoder of the router), in eval mode."""
    from transformers import AutoModel

    from moegate.encoder import resolve_model

    return AutoModel.from_pretrained(resolve_model(config["backbone"]["model"])).eval()


def compute_states(model, split: TokenSplit, device: torch.device, batch_size: int = BATCH_SIZE,
                   desc: str = "states") -> torch.Tensor:
    """(N, rows, H) pooled states of every row of ``split`` through ``model`` (a DactRouterModel),
    in input order; rows are batched by length so padding costs little."""
    from tqdm.auto import tqdm

    n = len(split)
    out = torch.zeros(model.num_layers, n, model.hidden_size, dtype=torch.float32)
    order = torch.argsort(split.attention_mask.sum(1), stable=True)
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=None, leave=False):
            idx = order[start:start + batch_size]
            ids, mask = split.input_ids[idx].to(device), split.attention_mask[idx].to(device)
            out[:, idx] = model.states(ids, mask).float().cpu()
    return out


def states(config: dict) -> dict:
    """The rule: write ``states/{split}.safetensors`` for every split and ``states/report.json``, all
    into a temporary sibling of ``states/`` that replaces it whole at the end; returns a summary."""
    layout = Layout.from_config(config)
    with atomic_dir(layout.states) as staged:
        summary = _states(config, layout.staged(states_dir=staged))
    for split in SPLITS:  # the next run's cache: these very files (a killed link leaves the older cache, still valid)
        rowcache.link(layout.state_file(split), layout.states_cache(split))
    return summary


def _states(config: dict, layout: Layout) -> dict:
    from safetensors.torch import save_file

    from moegate.encoder import device as pick_device
    from moegate.models.dact import DactRouterModel, HeadConfig
    from moegate.training import read_labels

    t0 = time.perf_counter()
    labels = read_labels(layout)
    device = pick_device(config["device"])
    encoder = frozen_encoder(config)
    model = DactRouterModel(encoder, len(labels), HeadConfig(**config["router"]["head"])).to(device)
    identity = {**rowcache.encoder_identity(config["backbone"]["model"]), "pooling": model.head_config.pooling}
    index, cached = rowcache.read([layout.states_cache(s) for s in SPLITS], identity, "states", axis=1)
    summary = {"encoder": config["backbone"]["model"], "pooling": model.head_config.pooling, "splits": {},
               "reused": 0, "computed": 0}
    for split in SPLITS:
        path = layout.tokens(split)
        tokens = load_tokens(path)
        keys = rowcache.token_keys(tokens.input_ids, tokens.attention_mask)
        found, values = rowcache.lookup(keys, index, cached)
        pooled = torch.zeros(model.num_layers, len(tokens), model.hidden_size, dtype=torch.float32)
        if values is not None:
            pooled[:, found] = values.movedim(0, 1).float()
        missing = (~found).nonzero().squeeze(1)
        if len(missing):
            sub = TokenSplit(tokens.input_ids[missing], tokens.attention_mask[missing], tokens.labels[missing],
                             source=tokens.source)
            pooled[:, missing] = compute_states(model, sub, device, desc=f"states {split}")
        frame = pd.read_parquet(layout.split(split), columns=["kind"])
        tensors = {"states": pooled.to(STATE_DTYPE).contiguous(), "labels": tokens.labels.contiguous(),
                   "window": torch.tensor((frame["kind"] == "window").to_numpy(), dtype=torch.uint8),
                   rowcache.KEY_TENSOR: keys}
        if tokens.teacher is not None:
            tensors["teacher"] = tokens.teacher.contiguous()
        meta = {**identity, "tokens_digest": file_digest(path), "cache_format": rowcache.FORMAT}
        with atomic_path(layout.state_file(split)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        reused = int(found.sum())
        summary["splits"][split] = {"rows": len(tokens), "shape": list(pooled.shape), "reused": reused,
                                    "computed": len(tokens) - reused}
        summary["reused"] += reused
        summary["computed"] += len(tokens) - reused
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    write_json(layout.states / "report.json", summary)
    log.info("states: %s in %.1f s (%d rows reused from the last run, %d computed)",
             {s: v["rows"] for s, v in summary["splits"].items()}, summary["wall_s"], summary["reused"],
             summary["computed"])
    return summary


def load_states(config: dict, split: str) -> StateSplit:
    """``states/{split}.safetensors`` as a StateSplit; refuses a cache made from other tokens or another
    encoder/pooling than the config names (rerun the states stage)."""
    from safetensors import safe_open

    layout = Layout.from_config(config)
    path = layout.state_file(split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing cached states (run `moegate states`)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {"encoder": config["backbone"]["model"], "pooling": config["router"]["head"]["pooling"],
                "tokens_digest": file_digest(layout.tokens(split))}
    stale = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if stale:
        raise ValueError(f"{path}: cached states do not match this run ({', '.join(stale)} differ); "
                         "rerun `moegate states`")
    window = tensors.get("window")
    return StateSplit(tensors["states"].float(), tensors["labels"].long(),
                      tensors["teacher"].float() if "teacher" in tensors else None,
                      window.bool() if window is not None else None, source=str(path))


def prototype_rows(split: StateSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, labels) the prototypes are initialised from: the KB windows when the split has them
    (the knowledge base's own pooled states), else every row."""
    if split.window is not None and bool(split.window.any()):
        rows = split.window
        return split.states[:, rows], split.labels[rows]
    return split.states, split.labels
