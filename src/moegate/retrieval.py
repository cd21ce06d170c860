"""Retrieval routing: no trained router, just the knowledge bases. The baseline the router must beat,
and the teacher it learns from.

A question is embedded with the KB's encoder (``encoder.model``, mean-pooled, L2-normalised); each
expert's score is the mean cosine of its ``top_k`` nearest KB chunks; the expert with the highest
score wins. As a distribution (the teacher), the scores go through a softmax at ``temperature``.

The index is every expert's chunk embeddings in the encoder's space. A KB ingested from documents
was embedded by that encoder (its ``kb/{expert}.report.json`` says which), so its vectors are used as
they are; a vector export may come from any encoder (the demo's is 768-d), so its text is embedded
again with ``encoder.model``. :func:`build_index` writes ``dataset/kb_index.safetensors``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moegate.io import atomic_path, read_json, read_table
from moegate.layout import Layout

log = logging.getLogger(__name__)



@dataclass
class KBIndex:
    """Unit-length chunk vectors (chunks, dim) float32, the expert index of each chunk, its KB row id."""

    vectors: torch.Tensor
    expert: torch.Tensor  # (chunks,) int64, index into labels
    chunk_ids: list[str]
    labels: list[str]
    encoder: str

    def __len__(self) -> int:
        return int(self.expert.shape[0])

    def save(self, path: str | Path) -> None:
        import json

        from safetensors.torch import save_file

        meta = {"labels": json.dumps(self.labels), "encoder": self.encoder, "chunk_ids": json.dumps(self.chunk_ids)}
        with atomic_path(Path(path)) as tmp:
            save_file({"vectors": self.vectors.contiguous(), "expert": self.expert.contiguous()}, str(tmp),
                      metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> KBIndex:
        import json

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing KB index (did the dataset stage run?)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            try:
                tensors = {k: f.get_tensor(k) for k in ("vectors", "expert")}
                labels, chunk_ids = json.loads(meta["labels"]), json.loads(meta["chunk_ids"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: not a KB index (vectors, expert, labels, chunk_ids): {e}") from None
        return cls(tensors["vectors"].float(), tensors["expert"].long(), chunk_ids, labels, meta.get("encoder", ""))

    def expert_scores(self, queries: torch.Tensor, top_k: int = 10, exclude: torch.Tensor | None = None,
                      batch_size: int = 256) -> torch.Tensor:
        """(n, K) mean cosine of each expert's ``top_k`` nearest chunks to each unit-length query.

        ``exclude``: (n,) chunk row per query to leave out (a KB window's own chunk), −1 for none.
        An expert with fewer than ``top_k`` chunks averages the ones it has.
        """
        queries = torch.as_tensor(queries, dtype=torch.float32)
        out = torch.empty(queries.shape[0], len(self.labels))
        masks = [self.expert == e for e in range(len(self.labels))]
        for start in range(0, queries.shape[0], batch_size):
            sims = queries[start:start + batch_size] @ self.vectors.T  # (b, chunks)
            if exclude is not None:
                rows = exclude[start:start + batch_size]
                hit = rows >= 0
                sims[hit.nonzero().squeeze(1), rows[hit]] = -2.0  # below any cosine
            for e, mask in enumerate(masks):
                part = sims[:, mask]
                k = min(int(top_k), part.shape[1])
                out[start:start + batch_size, e] = part.topk(k, dim=1).values.mean(1) if k else -1.0
        return out


def teacher_distribution(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of retrieval scores at ``temperature``: the teacher's expert distribution (n, K)."""
    return torch.softmax(scores / float(temperature), dim=-1)


def question_max_length(config: dict) -> int:
    """Tokens of a question the KB's encoder reads: ``encoder.max_length``, as for the chunks.

    A RAG system embeds the whole question; 15 % of the OpenStax MMLU dev questions are longer than 64
    tokens, and cutting them there costs retrieval routing 1.5 points (0.842 → 0.827 on those 462)."""
    return int(config["encoder"]["max_length"])


def embed_queries(texts: list[str], config: dict) -> torch.Tensor:
    """Unit-length question embeddings (n, dim) with the KB's encoder."""
    from moegate.encoder import embed

    enc = config["encoder"]
    vectors = embed(texts, enc["model"], batch_size=max(32, enc["batch_size"]),
                    max_length=question_max_length(config), device_setting=config["device"])
    return torch.from_numpy(vectors)


def build_index(config: dict, labels: list[str], layout: Layout | None = None, cache: bool = False,
                stats: dict | None = None) -> KBIndex:
    """Every expert's KB chunks in ``encoder.model``'s space (see the module docstring).

    ``cache``: chunks embedded again are kept per expert in ``results/cache/kb_index/`` (keyed by their
    text, under the same encoder and max length), so a rebuild after an expert was added embeds only
    the new KB; a cached expert that is no longer in ``labels`` is deleted. ``stats``: filled with
    {expert: {"chunks", "reused"}}.
    """
    from moegate import rowcache
    from moegate.encoder import embed

    layout = layout or Layout.from_config(config)
    enc = config["encoder"]
    identity = {**rowcache.encoder_identity(enc["model"]), "max_length": enc["max_length"]} if cache else {}
    vectors, experts, ids = [], [], []
    for i, expert in enumerate(labels):
        kb = read_table(layout.kb(expert), ("id", "text", "embedding"), f"did `moegate ingest --expert {expert}` run?")
        report_path = layout.kb_report(expert)
        report = read_json(report_path) if report_path.is_file() else {}
        same_encoder = report.get("kind") == "documents" and report.get("encoder", {}).get("model") == enc["model"]
        reused = 0
        if same_encoder and len(kb):
            v = np.stack(kb["embedding"].to_numpy()).astype(np.float32)
            reused = len(kb)
        else:
            log.info("retrieval index: %s's %d chunks in %s's space (the KB's vectors come from %s); embedding "
                     "those not cached", expert, len(kb), enc["model"], report.get("kind", "an unknown encoder"))
            v, reused = rowcache.embed_with_cache(
                kb["text"].astype(str).tolist(), layout.kb_vectors_cache(expert) if cache else None, identity,
                lambda texts: embed(texts, enc["model"], batch_size=enc["batch_size"], max_length=enc["max_length"],
                                    device_setting=config["device"]))
        if stats is not None:
            stats[expert] = {"chunks": len(kb), "reused": int(reused)}
        v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-9, None)
        vectors.append(v.astype(np.float32))
        experts += [i] * len(v)
        ids += kb["id"].astype(str).tolist()
    if cache:  # a removed expert's cached KB goes with it (adding it back embeds its KB again)
        for path in layout.kb_vectors_caches.glob("*.safetensors"):
            if path.stem not in labels:
                path.unlink()
                log.info("retrieval index: %s is no longer an expert; removed its cached KB %s", path.stem, path)
    dim = vectors[0].shape[1] if vectors else 0
    return KBIndex(torch.from_numpy(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)),
                   torch.tensor(experts, dtype=torch.long), ids, list(labels), enc["model"])


class RetrievalRouter:
    """Retrieval routing as a routing method: ``predict(texts)`` → (n, K) scores."""

    def __init__(self, index: KBIndex, config: dict, top_k: int = 10):
        self.index, self.config, self.top_k = index, config, int(top_k)

    def scores(self, texts: list[str]) -> torch.Tensor:
        return self.index.expert_scores(embed_queries(texts, self.config), self.top_k)

    def predict(self, texts: list[str]) -> np.ndarray:
        return self.scores(texts).argmax(1).numpy()
