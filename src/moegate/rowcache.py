"""Row caches: values computed per row (a text's embedding, a row's per-layer encoder states) kept
between runs of a stage, so a run after an expert was added or removed computes only the rows it has
not seen.

A cache file is a safetensors file with a ``row_key`` tensor (rows, 16) uint8, one key per row (a
digest of what the row's value is computed from: its text, or its tokens), a values tensor with one
entry per row along ``axis``, and metadata naming everything else the values depend on (the encoder,
its weights' digest, the pooling, the max length). A file whose metadata differs from what the
caller expects is not read: a changed encoder recomputes everything. The files live under
``results/cache/`` (:class:`moegate.layout.Layout`), never among a rule's outputs, since Snakemake
deletes those before a job reruns. Keys are 128-bit BLAKE2b digests: a collision among a run's
rows has probability ~n²/2¹²⁹.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from moegate.io import atomic_path

log = logging.getLogger(__name__)

KEY_BYTES = 16
KEY_TENSOR = "row_key"
FORMAT = "1"  # the cache layout; a file of another format is ignored


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """(n, 16) uint8: one digest per text (UTF-8)."""
    return _keys(t.encode("utf-8") for t in texts)


def token_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, 16) uint8: one digest per row of the tokens each row attends to (its ids, up to the padding),
    so the same text tokenized to the same ids has one key whatever the padding length."""
    ids = input_ids.to(torch.int64).numpy()
    mask = attention_mask.to(torch.bool).numpy()
    return _keys(ids[i][mask[i]].tobytes() for i in range(len(ids)))


def _keys(items: Iterable[bytes]) -> torch.Tensor:
    digests = [hashlib.blake2b(b, digest_size=KEY_BYTES).digest() for b in items]
    if not digests:
        return torch.zeros((0, KEY_BYTES), dtype=torch.uint8)
    return torch.from_numpy(np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, KEY_BYTES).copy())


def read(paths: Iterable[Path], meta: dict[str, str], values: str, axis: int = 0
         ) -> tuple[dict[bytes, int], torch.Tensor | None]:
    """The rows of every cache file at ``paths`` whose metadata holds ``meta``: (key → row of the
    returned tensor, the values with rows on axis 0), or ({}, None) when none is usable. Missing
    files, files of other metadata and unreadable files are skipped (logged)."""
    from safetensors import safe_open

    expected = {**{k: str(v) for k, v in meta.items()}, "cache_format": FORMAT}
    index: dict[bytes, int] = {}
    parts: list[torch.Tensor] = []
    rows = 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                found = f.metadata() or {}
                stale = sorted(k for k, v in expected.items() if found.get(k) != v)
                if stale:
                    log.info("%s: not reused (%s differ from this run)", path, ", ".join(stale))
                    continue
                keys, part = f.get_tensor(KEY_TENSOR), f.get_tensor(values).movedim(axis, 0)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # a damaged cache costs a recompute only
            log.warning("%s: unreadable cache file, not reused: %s", path, e)
            continue
        if keys.shape != (part.shape[0], KEY_BYTES):
            log.warning("%s: %s keys for %s rows, not reused", path, tuple(keys.shape), part.shape[0])
            continue
        flat = keys.contiguous().numpy().tobytes()
        for i in range(keys.shape[0]):
            index.setdefault(flat[i * KEY_BYTES:(i + 1) * KEY_BYTES], rows + i)
        parts.append(part)
        rows += part.shape[0]
    if not parts:
        return {}, None
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        log.warning("cache files %s hold rows of shapes %s, not reused", [str(p) for p in paths], sorted(shapes))
        return {}, None
    return index, torch.cat(parts) if len(parts) > 1 else parts[0]


def lookup(keys: torch.Tensor, index: dict[bytes, int], cached: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(found (n,) bool, the cached values of the found rows in order (found, ...) or None)."""
    flat = keys.contiguous().numpy().tobytes()
    rows = [index.get(flat[j:j + KEY_BYTES], -1) for j in range(0, len(flat), KEY_BYTES)]
    rows_t = torch.tensor(rows, dtype=torch.long)
    found = rows_t >= 0
    if cached is None or not bool(found.any()):
        return torch.zeros(len(rows), dtype=torch.bool), None
    return found, cached.index_select(0, rows_t[found])


def write(path: Path, keys: torch.Tensor, values: torch.Tensor, meta: dict[str, str], name: str = "values",
          extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write a cache file (atomically): ``keys`` (rows, 16), ``values`` with rows on axis 0 as ``name``."""
    from safetensors.torch import save_file

    tensors = {KEY_TENSOR: keys.contiguous(), name: values.contiguous(), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**{k: str(v) for k, v in meta.items()}, "cache_format": FORMAT})


def link(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` is (a hard link; a copy where the file system has none), atomically.
    The files a stage writes are never modified in place, so a link is a snapshot."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another device, or no hard links here
            shutil.copy2(src, tmp)


def encoder_identity(name: str) -> dict[str, str]:
    """What a cached value computed by the model ``name`` depends on: the name and, when the model is a
    local directory (the offline MiniLM, a path), the sha256 of its weights file."""
    from moegate.encoder import resolve_model
    from moegate.training import file_digest

    local = Path(resolve_model(name))
    for weights in ("model.safetensors", "pytorch_model.bin"):
        if (local / weights).is_file():
            return {"encoder": name, "encoder_weights": file_digest(local / weights)}
    return {"encoder": name, "encoder_weights": ""}


def embed_with_cache(texts: Sequence[str], path: Path | None, meta: dict[str, str], compute) -> tuple[np.ndarray, int]:
    """``compute(texts) -> (n, dim) float32 array`` for the texts the cache file at ``path`` does not hold
    (under ``meta``); then ``path`` holds exactly these texts' rows. Returns (every row's vector, the
    number reused). ``path`` None: no cache, everything computed."""
    if path is None or not len(texts):
        return compute(list(texts)), 0
    keys = text_keys(texts)
    index, cached = read([path], meta, "values")
    found, values = lookup(keys, index, cached)
    missing = (~found).nonzero().squeeze(1).tolist()
    fresh = compute([texts[i] for i in missing]) if missing else None
    dim = fresh.shape[1] if fresh is not None else values.shape[1]
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if values is not None:
        out[found.numpy()] = values.float().numpy()
    if fresh is not None:
        out[missing] = fresh
    write(path, keys, torch.from_numpy(out), meta)
    return out, int(found.sum())
