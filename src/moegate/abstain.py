"""Off-topic abstention: the score a router abstains on, and its threshold, chosen on validation questions.

A router names an expert for every question, "tell me a joke" and a question about another course
included. To abstain (``RouteResult.expert = None``) it needs a score that is high for questions the
experts' knowledge bases cover and low for the rest, and a threshold on it.

The scores (config ``router.abstain.score``):

- ``kb_similarity`` (default): the mean cosine between the question's pooled state after the last
  layer and its ``top_k`` nearest KB windows of the best-matching expert, in the router's own encoder
  space. The KB windows' last-layer states are saved in the router directory (``kb_index.safetensors``,
  a :class:`moegate.retrieval.KBIndex`), so the score needs no second encoder and no results tree. It
  needs layer N: questions that would exit early run the remaining layers for it (their expert and
  exit layer are still the early exit's).
- ``probability``: the top probability at the exit layer. Free (no extra layer), but a weak signal: a
  question about another subject is often routed with confidence to the nearest course.

Measured on the demo router with 527 real in-domain questions against 462 MMLU exam questions on
other subjects and 65 chit-chat/other-subject questions (``benchmarks/abstain.py``): AUROC 0.981 for
``kb_similarity``, 0.849 for ``probability`` (0.874 at the last layer); the prototype cosines the DACT
units already compute are in between (0.925 at the exit layer, 0.959 at the last) and weak at the
early layers (0.72-0.79 at layers 1-5, where course questions and other exam questions still look
alike); the same top-k cosine over the whole KB's chunks with a second encoder pass, 0.987. Hence the
default.

The threshold is calibrated, not hand-set: the value that abstains on at most
``router.abstain.max_in_domain_rate`` of the validation split's questions (:func:`threshold_for_rate`),
saved in the router's config.json as the default of ``Router.route``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SCORES = ("kb_similarity", "probability")
KB_INDEX_FILE = "kb_index.safetensors"  # in a router directory: the KB windows' last-layer states
FLOAT_MARGIN = 1e-6  # below the lowest calibration score: recomputing it in another batch moves it ~1e-7
KB_ENCODER = "router:last-layer"  # KBIndex.encoder of that file: the router's own pooled states, not encoder.model


def threshold_for_rate(scores, rate: float) -> float:
    """The threshold t on ``scores`` (in-domain questions) such that abstaining where score < t abstains
    on at most ``rate`` of them: with m = ⌊rate·n⌋, t lies halfway between the m-th and the (m+1)-th
    smallest score (just below the smallest when m = 0), so float noise in recomputing a score (another
    batch, another padding) does not move a question across it.

    In: a 1-d array of finite scores (n ≥ 1), rate in [0, 1). Out: t (a float).
    """
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size == 0:
        raise ValueError("threshold_for_rate: no in-domain scores to calibrate on")
    if not np.isfinite(values).all():
        raise ValueError("threshold_for_rate: the in-domain scores hold NaN or infinite values")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"max_in_domain_rate: expected a share in [0, 1), got {rate!r}")
    allowed = min(math.floor(float(rate) * values.size + 1e-9), values.size - 1)  # 0.02 · 100 is 2, not 1.99
    if allowed == 0:
        return float(values[0] - FLOAT_MARGIN)
    return float((values[allowed - 1] + values[allowed]) / 2)


def abstain_rate(scores, threshold: float | None) -> float:
    """Share of ``scores`` below ``threshold`` (the rows that abstain); 0 with no threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is None or scores.size == 0:
        return 0.0
    return float((~(scores >= float(threshold))).mean())  # "not ≥", as Router.decide: NaN abstains


def auroc(in_domain, off_topic) -> float | None:
    """Area under the ROC curve of a score separating in-domain (positive) from off-topic questions:
    the chance that a random in-domain question scores above a random off-topic one. None when one
    side is empty."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_domain, dtype=np.float64), np.asarray(off_topic, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return None
    return float(roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b]))


def kb_index_from_states(last_states: torch.Tensor, experts: torch.Tensor, labels: list[str], ids: list[str]):
    """A :class:`moegate.retrieval.KBIndex` of reference rows' last-layer pooled states (rows, H),
    L2-normalised: what ``kb_similarity`` compares a question with."""
    from moegate.retrieval import KBIndex

    vectors = F.normalize(torch.as_tensor(last_states, dtype=torch.float32), dim=-1).contiguous()
    experts = torch.as_tensor(experts, dtype=torch.long).contiguous()
    if vectors.dim() != 2 or vectors.shape[0] != experts.shape[0] or vectors.shape[0] != len(ids):
        raise ValueError(f"kb_index_from_states: {tuple(vectors.shape)} states, {tuple(experts.shape)} experts, "
                         f"{len(ids)} ids do not match")
    return KBIndex(vectors, experts, list(ids), list(labels), KB_ENCODER)


def kb_similarity(index, last_states: torch.Tensor, top_k: int) -> np.ndarray:
    """(n,) float32: for each last-layer pooled state, the best expert's mean cosine to its ``top_k``
    nearest rows of ``index`` (an expert with fewer rows averages the ones it has)."""
    queries = F.normalize(torch.as_tensor(last_states, dtype=torch.float32), dim=-1)
    if queries.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    return index.expert_scores(queries, int(top_k)).max(1).values.numpy().astype(np.float32)
