"""Stage 1, ingest: read one expert's knowledge base into ``kb/{expert}.parquet``.

An expert's ``source`` is either

* a vector export — JSONL (one object a line), a JSON array of objects, or Parquet — whose rows carry
  ``id``, ``text`` and ``embedding``; rows are validated and bad ones skipped and counted by reason
  (embeddings of different lengths are an error: they cannot come from one encoder); or
* a folder of documents (``.md``/``.markdown``/``.txt``/``.html``/``.htm``, searched recursively): each
  file is cleaned to plain text by :mod:`moegate.documents` (front matter, HTML tags, MathML, image
  links, kramdown attribute lists and link targets removed), cut into windows of encoder tokens that overlap, and embedded with the
  configured encoder (:func:`moegate.encoder.embed`), longest chunks first, with every embedded chunk
  kept in ``cache/embeddings/{expert}/`` so a rerun after a killed job embeds only what is missing.

Out: ``kb/{expert}.parquet`` (id, text, embedding as list<float32>, source) and
``kb/{expert}.report.json`` (what was read, kept and skipped, and why).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import time
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moegate.documents import clean_document
from moegate.encoder import embed, load_encoder
from moegate.errors import MoegateError
from moegate.io import atomic_path, write_json, write_parquet
from moegate.layout import Layout

log = logging.getLogger(__name__)

EXPORT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
DOCUMENT_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".html": "html", ".htm": "html"}
REQUIRED_COLUMNS = ("id", "text", "embedding")
EXAMPLES_PER_REASON = 5  # row references kept per skip reason in the report: enough to find the problem

# Why a row of a vector export is skipped; each skipped row is counted under the first that applies.
SKIP_REASONS = {
    "missing_id": "no id, or a blank one",
    "missing_text": "no text, blank text, or text that is not a string",
    "missing_embedding": "no embedding, or an empty one",
    "non_numeric_embedding": "embedding is not a flat list of numbers (a string, true/false, null, a nested list)",
    "non_finite_embedding": "embedding holds NaN or infinity",
    "out_of_range_embedding": "embedding holds a number beyond float32's range (about 3.4e38)",
    "duplicate_id": "id already seen earlier in the export (the first one is kept)",
}


class IngestError(MoegateError, ValueError):
    """A knowledge base cannot be read; the message names the expert, file and row where known."""


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def ingest(config: dict, expert: str) -> dict:
    """Read ``config.experts[expert].source`` and write the expert's KB parquet and report.

    Returns the report (also written to ``kb/{expert}.report.json``).
    Raises IngestError for an unknown expert, a missing/unreadable/malformed source, or no usable rows.
    """
    experts = config["experts"]
    if expert not in experts:
        raise IngestError(f"expert {expert!r} is not in config.experts (known: {', '.join(experts)})")
    source = Path(experts[expert]["source"])
    layout = Layout.from_config(config)
    started = time.perf_counter()
    if source.is_dir():
        frame, report = _ingest_documents(source, config, expert)
    elif source.is_file():
        frame, report = _ingest_export(source, expert)
    else:
        raise IngestError(f"expert {expert!r}: source {source} does not exist (expected a vector export "
                          f"file {sorted(EXPORT_SUFFIXES)} or a folder of documents)")
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_parquet(layout.kb(expert), frame)
    write_json(layout.kb_report(expert), report)
    log.info("%s: kept %d of %d rows (dim %d) -> %s", expert, report["rows_kept"], report["rows_read"],
             report["dim"], layout.kb(expert))
    return report


def _kb_frame(ids: list[str], texts: list[str], vectors: np.ndarray, sources: list[str]) -> pd.DataFrame:
    """The KB contract: id, text, embedding (one float32 array a row), source."""
    return pd.DataFrame({
        "id": pd.Series(ids, dtype=object),
        "text": pd.Series(texts, dtype=object),
        "embedding": list(np.asarray(vectors, dtype=np.float32)),
        "source": pd.Series(sources, dtype=object),
    })


# ---------------------------------------------------------------------------------------------
# Vector exports
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportRow:
    """One record of a vector export, before validation; ``ref`` says where it came from."""

    ref: str
    id: Any
    text: Any
    embedding: Any


def read_export(path: Path) -> tuple[str, list[ExportRow]]:
    """(format, rows) of a JSONL / JSON-array / Parquet vector export; IngestError if it cannot be read."""
    kind = EXPORT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise IngestError(f"{path}: unknown vector export type {path.suffix!r} "
                          f"(expected one of {', '.join(sorted(EXPORT_SUFFIXES))}, or a folder of documents)")
    reader = {"jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet}[kind]
    return kind, reader(path)


def _open_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise IngestError(f"{path}: cannot read: {e.strerror or e}") from None


def _record(obj: Any, ref: str, path: Path) -> ExportRow:
    if not isinstance(obj, dict):
        raise IngestError(f"{path}: {ref}: expected a JSON object with id, text, embedding; "
                          f"got {type(obj).__name__}")
    return ExportRow(ref, obj.get("id"), obj.get("text"), obj.get("embedding"))


def _read_jsonl(path: Path) -> list[ExportRow]:
    rows = []
    for number, line in enumerate(_open_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        rows.append(_record(obj, f"line {number}", path))
    return rows


def _read_json_array(path: Path) -> list[ExportRow]:
    try:
        data = json.loads(_open_text(path))
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise IngestError(f"{path}: expected a JSON array of objects at the top level, got {type(data).__name__}")
    return [_record(obj, f"item {i}", path) for i, obj in enumerate(data)]


def _read_parquet(path: Path) -> list[ExportRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"{path}: cannot read as Parquet: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise IngestError(f"{path}: missing column(s) {', '.join(missing)} "
                          f"(has {', '.join(table.column_names)}; expected {', '.join(REQUIRED_COLUMNS)})")
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist()
    # list columns come back as one numpy array a row, far cheaper than Python lists for 40k x 768
    vectors = table.column("embedding").to_numpy(zero_copy_only=False)
    return [ExportRow(f"row {i}", ids[i], texts[i], vectors[i]) for i in range(table.num_rows)]


def _as_vector(value: Any) -> tuple[np.ndarray | None, str | None]:
    """(vector as float64, None) or (None, skip reason) for one raw embedding value."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return None, "missing_embedding" if value is None else "non_numeric_embedding"
    # item by item: numpy would quietly turn a JSON true/false beside floats into 1.0/0.0
    if isinstance(value, list) and value and not all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
        return None, "non_numeric_embedding"
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting
        return None, "non_numeric_embedding"
    if raw.ndim != 1:
        return None, "missing_embedding" if raw.size == 0 else "non_numeric_embedding"
    if raw.size == 0:
        return None, "missing_embedding"
    numbers = raw.dtype.kind in "iuf" or (  # object arrays pass only when every item is a real number
        raw.dtype.kind == "O" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw))
    if not numbers:  # strings, booleans, nulls, mixed objects
        return None, "non_numeric_embedding"
    try:
        vector = raw.astype(np.float64)
    except OverflowError:  # a JSON integer of hundreds of digits
        return None, "out_of_range_embedding"
    if not np.isfinite(vector).all():
        return None, "non_finite_embedding"
    if (np.abs(vector) > np.finfo(np.float32).max).any():  # stored as float32: it would become infinity
        return None, "out_of_range_embedding"
    return vector, None


def validate_rows(rows: Iterable[ExportRow], source: str = "export") -> tuple[
        list[tuple[ExportRow, np.ndarray]], Counter, dict, int]:
    """Keep the usable rows of an export.

    Returns (kept [(row, vector)], skipped counts by reason, up to EXAMPLES_PER_REASON row refs per
    reason, the embedding dimension). Rows whose embeddings disagree on length are an IngestError
    naming ``source``, each length, its row count and a first row: they come from different encoders
    (or a broken export), and keeping the majority would quietly drop the rest of the knowledge base.
    """
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}

    def skip(row: ExportRow, reason: str) -> None:
        skipped[reason] += 1
        examples.setdefault(reason, [])
        if len(examples[reason]) < EXAMPLES_PER_REASON:
            examples[reason].append(row.ref if row.id is None else f"{row.ref} (id {row.id!r})")

    candidates = []
    for row in rows:
        if row.id is None or (isinstance(row.id, str) and not row.id.strip()) or isinstance(row.id, (dict, list)):
            skip(row, "missing_id")
            continue
        if not isinstance(row.text, str) or not row.text.strip():
            skip(row, "missing_text")
            continue
        vector, reason = _as_vector(row.embedding)
        if reason:
            skip(row, reason)
            continue
        candidates.append((row, vector))

    dims = Counter(len(v) for _, v in candidates)
    if len(dims) > 1:
        first = {}
        for row, vector in candidates:
            first.setdefault(len(vector), row.ref)
        lengths = ", ".join(f"{d} ({n} row(s), first at {first[d]})" for d, n in dims.most_common())
        raise IngestError(f"{source}: embeddings of {len(dims)} different lengths: {lengths}; every row needs "
                          "one length (one encoder): re-export the knowledge base")
    dim = next(iter(dims), 0)
    kept, seen = [], set()
    for row, vector in candidates:
        key = str(row.id).strip()
        if key in seen:
            skip(row, "duplicate_id")
        else:
            seen.add(key)
            kept.append((row, vector))
    return kept, skipped, examples, dim


def _ingest_export(path: Path, expert: str) -> tuple[pd.DataFrame, dict]:
    kind, rows = read_export(path)
    kept, skipped, examples, dim = validate_rows(rows, f"expert {expert!r}: {path}")
    report = {
        "expert": expert,
        "source": str(path),
        "kind": "vector_export",
        "format": kind,
        "rows_read": len(rows),
        "rows_kept": len(kept),
        "dim": dim,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "skip_reasons": {r: SKIP_REASONS[r] for r in sorted(skipped)},
    }
    if not kept:
        raise IngestError(f"expert {expert!r}: {path} has no usable rows ({len(rows)} read; skipped: "
                          f"{_describe(skipped) or 'none - the export is empty'})")
    if skipped:
        log.warning("%s: skipped %d of %d rows of %s: %s", expert, sum(skipped.values()), len(rows), path,
                    _describe(skipped))
    frame = _kb_frame([str(r.id).strip() for r, _ in kept], [r.text.strip() for r, _ in kept],
                      np.stack([v for _, v in kept]), [str(path)] * len(kept))
    return frame, report


def _describe(counts: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Documents: finding, chunking, embedding
# ---------------------------------------------------------------------------------------------


def find_documents(folder: Path, exclude: list[str]) -> tuple[list[Path], dict[str, str]]:
    """(documents to read, {relative path: why skipped}) under ``folder``, recursively, in path order.

    Hidden files and folders (``.git``) are passed over silently; files matching an ``exclude``
    glob (against the relative path or the file name) or with another suffix are listed as skipped.
    """
    documents, skipped = [], {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        name = rel.as_posix()
        if any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path.name, pattern) for pattern in exclude):
            skipped[name] = "excluded by ingest.exclude"
        elif path.suffix.lower() not in DOCUMENT_SUFFIXES:
            skipped[name] = f"not a document type ({', '.join(sorted(DOCUMENT_SUFFIXES))})"
        else:
            documents.append(path)
    return documents, skipped


@dataclass(frozen=True)
class Chunk:
    """A window of a cleaned document: tokens [first, end) and characters [start_char, end_char)."""

    index: int
    first: int
    end: int
    start_char: int
    end_char: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.first


def token_windows(word_start: list[bool], sentence_end: list[bool], chunk_tokens: int, overlap: int,
                  min_chunk_tokens: int) -> list[tuple[int, int]]:
    """Token windows [first, end) covering ``len(word_start)`` tokens, in order.

    Each window has at most ``chunk_tokens`` tokens and ends, where it can, after a sentence end found
    in its last quarter, else at a word boundary. The next window starts ``overlap`` tokens before the
    previous end, moved back to the start of that word (so neighbours share at least ``overlap`` tokens
    and no chunk starts mid-word). When fewer than ``min_chunk_tokens`` new tokens would be left for a
    last window, they join the window before instead (which then exceeds ``chunk_tokens`` by less than
    ``min_chunk_tokens``).
    """
    n = len(word_start)
    windows: list[tuple[int, int]] = []
    first = 0
    while first < n:
        hi = first + chunk_tokens
        if hi >= n:
            end = n
        else:
            lo = min(hi, first + max(overlap + 1, math.ceil(0.75 * chunk_tokens)))
            end = next((e for e in range(hi, lo - 1, -1) if sentence_end[e - 1]), None)
            if end is None:
                end = next((e for e in range(hi, lo - 1, -1) if word_start[e]), hi)
            if n - end < min_chunk_tokens:
                end = n
        windows.append((first, end))
        if end >= n:
            break
        nxt = end - overlap
        back = nxt
        while back > first + 1 and not word_start[back]:
            back -= 1
        first = back if word_start[back] and back > first else nxt
    return windows


def chunk_document(text: str, tokenizer, chunk_tokens: int, overlap: int, min_chunk_tokens: int) -> list[Chunk]:
    """Cut cleaned ``text`` into overlapping windows of the encoder's tokens (see :func:`token_windows`).

    Chunk text is the original span of ``text`` (case and spacing kept, not a lower-cased decode).
    A document with fewer than ``min_chunk_tokens`` tokens gives no chunks.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    n = len(offsets)
    if n < min_chunk_tokens or n == 0:
        return []
    # a token starts a word when whitespace separates it from the previous token
    word_start = [i == 0 or offsets[i][0] > offsets[i - 1][1] for i in range(n)]
    sentence_end = []
    for i, (_, stop) in enumerate(offsets):
        following = text[stop : offsets[i + 1][0]] if i + 1 < n else "\n"
        sentence_end.append("\n" in following or (text[stop - 1] in ".!?" and following != ""))
    windows = token_windows(word_start, sentence_end, chunk_tokens, overlap, min_chunk_tokens)
    return [Chunk(k, a, b, offsets[a][0], offsets[b - 1][1]) for k, (a, b) in enumerate(windows)]


class EmbeddingCache:
    """Chunk embeddings already computed, in ``.npz`` shards under ``folder``, keyed by encoder + text.

    A killed or preempted ingest job keeps every shard it flushed, so the rerun embeds only what is
    missing; changing the encoder (model, max_length) changes every key, so stale vectors are never used.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.vectors: dict[str, np.ndarray] = {}
        for shard in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            try:
                with np.load(shard, allow_pickle=False) as data:
                    self.vectors.update(zip(data["keys"].tolist(), data["vectors"]))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                log.warning("%s: unreadable embedding cache shard, ignored (%s)", shard, e)

    @staticmethod
    def key(encoder: dict, text: str) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for part in (encoder["model"], str(encoder["max_length"]), text):
            digest.update(part.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        """Keep ``vectors`` and write them as one new shard (atomically: never half a shard)."""
        if not vectors:
            return
        self.vectors.update(vectors)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{hashlib.blake2b(''.join(vectors).encode(), digest_size=6).hexdigest()}"
        with atomic_path(self.folder / f"{name}.npz") as tmp, tmp.open("wb") as f:
            np.savez(f, keys=np.array(list(vectors)), vectors=np.stack(list(vectors.values())))


def embedding_cache_dir(config: dict, expert: str) -> Path:
    """Where an expert's chunk embeddings are cached: beside the LLM cache, outside any rule's outputs."""
    return Layout.from_config(config).llm_cache.parent / "embeddings" / expert


def embed_cached(texts: list[str], encoder: dict, device_setting: str, cache_dir: Path, desc: str,
                 flush_every: int = 2048) -> tuple[np.ndarray, dict]:
    """Embeddings of ``texts`` in input order, and {"cached": n, "computed": m} (distinct texts).

    Texts missing from the cache are embedded longest first (by characters, a cheap proxy for tokens)
    so each batch holds similar lengths and wastes little padding; identical texts are embedded once.
    Every ``flush_every`` new vectors go to the cache. A tqdm bar counts distinct chunks.
    """
    cache = EmbeddingCache(cache_dir)
    keys = [EmbeddingCache.key(encoder, t) for t in texts]
    todo = {k: t for k, t in zip(keys, texts) if k not in cache.vectors}
    order = sorted(todo, key=lambda k: -len(todo[k]))
    distinct = len(set(keys))
    batch, pending = encoder["batch_size"], {}
    with tqdm(total=distinct, initial=distinct - len(order), desc=desc, unit="chunk", disable=None) as bar:
        for i in range(0, len(order), batch):
            part = order[i : i + batch]
            vectors = embed([todo[k] for k in part], encoder["model"], batch_size=batch,
                            max_length=encoder["max_length"], device_setting=device_setting)
            pending.update(zip(part, vectors))
            if len(pending) >= flush_every:
                cache.add(pending)
                pending = {}
            bar.update(len(part))
    cache.add(pending)
    out = np.stack([cache.vectors[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
    return out, {"cached": distinct - len(order), "computed": len(order)}


def _ingest_documents(folder: Path, config: dict, expert: str) -> tuple[pd.DataFrame, dict]:
    ing, encoder = config["ingest"], config["encoder"]
    documents, skipped_files = find_documents(folder, ing.get("exclude", []))
    tokenizer, model = load_encoder(encoder["model"], config.get("device", "auto"))
    longest = ing["chunk_tokens"] + ing["min_chunk_tokens"] - 1
    if longest + 2 > encoder["max_length"]:  # +2: [CLS] and [SEP]
        log.warning("chunks of up to %d tokens exceed encoder.max_length %d: their tails are not embedded",
                    longest, encoder["max_length"])

    ids, texts, sources, kinds = [], [], [], Counter()
    for path in tqdm(documents, desc=f"{expert}: chunk", unit="file", disable=None):
        rel = path.relative_to(folder).as_posix()
        kind = DOCUMENT_SUFFIXES[path.suffix.lower()]
        cleaned = clean_document(_open_text(path), kind)
        if not cleaned:
            skipped_files[rel] = "no text after cleaning"
            continue
        chunks = chunk_document(cleaned, tokenizer, ing["chunk_tokens"], ing["chunk_overlap"],
                                ing["min_chunk_tokens"])
        if not chunks:
            skipped_files[rel] = f"shorter than ingest.min_chunk_tokens ({ing['min_chunk_tokens']} tokens)"
            continue
        kinds[kind] += 1
        for c in chunks:
            ids.append(f"{rel}#{c.index}")  # stable across reruns: the file and the chunk's place in it
            texts.append(cleaned[c.start_char : c.end_char])
            sources.append(f"{(folder / rel).as_posix()}#{c.index}")

    files_read = sum(kinds.values())
    if not ids:
        raise IngestError(f"expert {expert!r}: no usable documents in {folder} ({len(documents)} document "
                          f"file(s) found; {len(skipped_files)} skipped: "
                          f"{_describe(Counter(skipped_files.values())) or 'the folder is empty'})")
    started = time.perf_counter()
    vectors, counts = embed_cached(texts, encoder, config.get("device", "auto"),
                                   embedding_cache_dir(config, expert), desc=f"{expert}: embed")
    seconds = time.perf_counter() - started
    log.info("%s: %d chunks from %d files; embedded %d in %.1f s (%.1f chunks/s), %d from the cache", expert,
             len(ids), files_read, counts["computed"], seconds, counts["computed"] / max(seconds, 1e-9),
             counts["cached"])
    report = {
        "expert": expert,
        "source": str(folder),
        "kind": "documents",
        "format": dict(sorted(kinds.items())),
        "rows_read": len(ids),
        "rows_kept": len(ids),
        "dim": int(vectors.shape[1]),
        "skipped": {},
        "files_read": files_read,
        "files_skipped": len(skipped_files),
        "files_skipped_by_reason": dict(sorted(Counter(skipped_files.values()).items())),
        "skipped_files": dict(sorted(skipped_files.items())),
        "chunks": len(ids),
        "chunk_tokens": {"target": ing["chunk_tokens"], "overlap": ing["chunk_overlap"],
                         "min": ing["min_chunk_tokens"]},
        "encoder": {"model": encoder["model"], "max_length": encoder["max_length"],
                    "batch_size": encoder["batch_size"], "device": str(model.device)},
        "embedding_cache": counts,
        "embed_seconds": round(seconds, 3),
        "chunks_per_second": round(counts["computed"] / max(seconds, 1e-9), 2),  # chunks embedded, not cached
    }
    return _kb_frame(ids, texts, vectors, sources), report
