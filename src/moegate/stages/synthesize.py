"""The synthesize stage: group each cluster's chunks into contexts and ask a backend for questions.

Reads ``kb/{expert}.parquet`` (id, text, ...) and ``clusters/{expert}.parquet`` (id, cluster, ...),
packs each cluster's chunk texts, in knowledge-base order, into contexts of at most
``synthesize.context_tokens`` whitespace tokens, and asks the configured backend for
``questions_per_context`` questions per context:

- ``offline`` (:mod:`moegate.questions`): templates filled from the context's own words; no server.
- ``openai`` (:mod:`moegate.llm`): any OpenAI-compatible chat model, cached on disk.

Writes ``queries/{expert}.parquet`` (query, expert, cluster, context_id, backend, model; context_id is
``{expert}/{cluster}/{k}``, unique across experts) and ``queries/{expert}.report.json``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm import tqdm

from moegate.errors import MoegateError
from moegate.io import read_table, write_json, write_parquet
from moegate.layout import Layout
from moegate.llm import Outcome

log = logging.getLogger(__name__)

QUERY_COLUMNS = ["query", "expert", "cluster", "context_id", "backend", "model"]
TRANSIENT_FAILURES = ("rate_limited", "server_error", "timeout", "connection_error", "malformed_response")
_FAILURES_LISTED = 20  # failed contexts named in the report (the counts cover all of them)


class SynthesizeError(MoegateError, ValueError):
    """The expert's KB or cluster table cannot be used; the message names the file and what was expected."""


@dataclass(frozen=True)
class Context:
    """A group of one cluster's chunks that fits the token budget: what one request asks about."""

    context_id: str
    cluster: int
    text: str
    chunk_ids: tuple[str, ...]
    tokens: int


def build_contexts(kb: pd.DataFrame, clusters: pd.DataFrame, expert: str, context_tokens: int,
                   kb_path: str = "kb", clusters_path: str = "clusters") -> list[Context]:
    """Pack each cluster's chunk texts (in knowledge-base order) into contexts of <= context_tokens.

    A chunk longer than the budget becomes a context of its own, cut to the budget. Chunks that the
    cluster table leaves out (noise dropped by the cluster stage) are not used.
    """
    if kb["id"].duplicated().any():
        dup = kb.loc[kb["id"].duplicated(), "id"].iloc[0]
        raise SynthesizeError(f"{kb_path}: duplicate id {dup!r}; ids must be unique")
    order = pd.Series(range(len(kb)), index=kb["id"].astype(str))
    ids = clusters["id"].astype(str)
    unknown = ids[~ids.isin(order.index)]
    if len(unknown):
        raise SynthesizeError(f"{clusters_path}: {len(unknown)} id(s) not in {kb_path}, e.g. {unknown.iloc[0]!r}; "
                              "was the cluster stage run on another knowledge base?")
    texts = kb["text"].astype(str).to_numpy()
    table = pd.DataFrame({"id": ids, "cluster": clusters["cluster"].astype(int),
                          "row": order[ids].to_numpy()})
    contexts: list[Context] = []
    for cluster, group in table.sort_values(["cluster", "row"]).groupby("cluster", sort=True):
        chunks = [(cid, texts[row].split()) for cid, row in zip(group["id"], group["row"])]
        for k, members in enumerate(_pack([c for c in chunks if c[1]], context_tokens)):
            words = [w for _, chunk in members for w in chunk]
            contexts.append(Context(f"{expert}/{cluster}/{k}", int(cluster),
                                    "\n\n".join(" ".join(chunk) for _, chunk in members),
                                    tuple(cid for cid, _ in members), len(words)))
    return contexts


def _pack(chunks: list[tuple[str, list[str]]], budget: int) -> list[list[tuple[str, list[str]]]]:
    """Greedy, order-keeping groups of (id, words) chunks with at most ``budget`` words each."""
    groups: list[list[tuple[str, list[str]]]] = []
    current: list[tuple[str, list[str]]] = []
    used = 0
    for chunk_id, words in chunks:
        if len(words) > budget:  # a chunk over the budget: a context of its own, cut to the budget
            words = words[:budget]
        if current and used + len(words) > budget:
            groups.append(current)
            current, used = [], 0
        current.append((chunk_id, words))
        used += len(words)
    if current:
        groups.append(current)
    return groups


def _normal(question: str) -> str:
    """The form duplicates are judged by: case, spacing and end punctuation ignored."""
    return re.sub(r"\s+", " ", question).strip().rstrip("?.! ").lower()


def make_writer(config: dict[str, Any], layout: Layout):
    """The configured backend: an object with ``name``, ``model`` and ``questions_for``."""
    section = config["synthesize"]
    if section["backend"] == "openai":
        from moegate.llm import OpenAIQuestionWriter, OpenAISettings

        return OpenAIQuestionWriter(OpenAISettings.from_config(section["openai"]), layout.llm_cache)
    from moegate.questions import OfflineQuestionWriter

    return _Offline(OfflineQuestionWriter(seed=int(config.get("seed", 0))))


class _Offline:
    """The offline writer behind the same ``questions_for`` interface as the openai backend."""

    name = "offline"

    def __init__(self, writer):
        self.writer = writer
        self.model = writer.model

    def questions_for(self, contexts: list[tuple[str, str]], n: int) -> list[Outcome]:
        return [Outcome(cid, questions=self.writer.questions(cid, text, n))
                for cid, text in tqdm(contexts, desc="questions", unit="context", disable=None)]

    def close(self) -> None:
        pass


def synthesize(config: dict[str, Any], expert: str) -> dict[str, Any]:
    """Write queries/{expert}.parquet and its report; returns the report.

    Raises when no question was written, or when more than ``synthesize.max_failed_fraction`` of the
    contexts got no reply for a transient reason (rate limits, 5xx, timeouts): a rerun then asks again
    only for those, since every reply already received is cached.
    """
    start = time.monotonic()
    if expert not in config["experts"]:
        raise KeyError(f"expert {expert!r} is not in config.experts ({', '.join(config['experts'])})")
    section = config["synthesize"]
    n = int(section["questions_per_context"])
    layout = Layout.from_config(config)
    kb_path, clusters_path = layout.kb(expert), layout.clusters(expert)
    try:
        kb = read_table(kb_path, ["id", "text"], "run the ingest stage first")
        clusters = read_table(clusters_path, ["id", "cluster"], "run the cluster stage first")
    except (FileNotFoundError, ValueError) as e:  # the message names the file
        raise SynthesizeError(str(e)) from None
    contexts = build_contexts(kb, clusters, expert, int(section["context_tokens"]),
                              str(kb_path), str(clusters_path))
    if not contexts:
        raise SynthesizeError(f"{clusters_path}: no chunk with text for expert {expert!r}; nothing to ask about")
    log.info("%s: %d contexts from %d chunks in %d clusters", expert, len(contexts),
             sum(len(c.chunk_ids) for c in contexts), len({c.cluster for c in contexts}))

    writer = make_writer(config, layout)
    try:
        outcomes = writer.questions_for([(c.context_id, c.text) for c in contexts], n)
    finally:
        writer.close()

    rows, skipped_questions = [], Counter()
    seen: set[str] = set()
    for context, outcome in zip(contexts, outcomes):
        if outcome.failure is None and len(outcome.questions) < n:
            skipped_questions["short_reply"] += n - len(outcome.questions)
        for q in outcome.questions:
            key = _normal(q)
            if not key:
                skipped_questions["empty"] += 1
            elif key in seen:
                skipped_questions["duplicate"] += 1
            else:
                seen.add(key)
                rows.append((q.strip(), expert, context.cluster, context.context_id,
                             writer.name, writer.model))
    failed = [o for o in outcomes if o.failure is not None]
    skipped_contexts = Counter(o.failure for o in failed)
    report = {
        "expert": expert,
        "backend": writer.name,
        "model": writer.model,
        "contexts": len(contexts),
        "chunks": sum(len(c.chunk_ids) for c in contexts),
        "context_tokens": {"budget": int(section["context_tokens"]),
                           "mean": round(sum(c.tokens for c in contexts) / len(contexts), 1),
                           "max": max(c.tokens for c in contexts)},
        "questions_per_context": n,
        "requested": n * len(contexts),
        "written": len(rows),
        "skipped": {"contexts": dict(skipped_contexts), "questions": dict(skipped_questions)},
        "failures": [{"context_id": o.context_id, "reason": o.failure, "detail": o.detail}
                     for o in failed[:_FAILURES_LISTED]],
        "requests": sum(o.calls for o in outcomes),
        "bad_replies": sum(o.bad_replies for o in outcomes),
        "cache": {"hits": sum(o.cache_hits for o in outcomes),
                  "misses": sum(o.cache_misses for o in outcomes)},
        "tokens": {"prompt": sum(o.prompt_tokens for o in outcomes),
                   "completion": sum(o.completion_tokens for o in outcomes),
                   "cached_prompt": sum(o.cached_prompt_tokens for o in outcomes),
                   "cached_completion": sum(o.cached_completion_tokens for o in outcomes)},
        "waited_s": round(sum(o.waited_s for o in outcomes), 2),
        "wall_s": round(time.monotonic() - start, 2),
    }
    transient = sum(skipped_contexts[r] for r in TRANSIENT_FAILURES)
    limit = float(section["max_failed_fraction"])
    if transient > limit * len(contexts):
        raise RuntimeError(
            f"synthesize {expert}: {transient} of {len(contexts)} contexts got no reply "
            f"({dict(skipped_contexts)}), more than synthesize.max_failed_fraction={limit}; "
            f"rerun to ask again for those only (received replies are cached in {layout.llm_cache})"
        )
    if not rows:
        raise RuntimeError(f"synthesize {expert}: no question written for {len(contexts)} contexts "
                           f"(skipped: {report['skipped']})")
    frame = pd.DataFrame(rows, columns=QUERY_COLUMNS).astype({"cluster": "int64"})
    write_parquet(layout.queries(expert), frame)
    write_json(layout.queries_report(expert), report)
    log.info("%s: %d questions for %d contexts (%s backend, %s); skipped %s", expert, len(rows),
             len(contexts), writer.name, writer.model, report["skipped"])
    return report
