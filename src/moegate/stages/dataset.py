"""Stage 4, dataset: merge the experts' queries, clean them, split them by context, tokenize them.

In:  ``queries/{expert}.parquet`` of every expert (query, expert, cluster, context_id, backend, model),
     or, when ``dataset.labelled_csv`` is set, a user's own CSV with ``question,expert`` columns
     (optionally ``context_id``).
Out: ``dataset/{train,val,test}.parquet`` (query, expert, label, context_id, cluster, backend, kind,
     chunk), ``dataset/labels.json`` (the expert order = ``config.experts`` order),
     ``dataset/tokenized/{split}.safetensors`` (input_ids, attention_mask, labels: int64; teacher:
     float32 (rows, K) when the retrieval teacher is on), ``dataset/kb_index.safetensors`` (the KB
     chunks in the encoder's space, :mod:`moegate.retrieval`) and ``dataset/report.json`` (rows
     in/out per reason, per-split per-expert counts, truncation, the teacher's agreement).

Two things beside the questions, both from the knowledge bases (synthesized source only):

- KB windows (``dataset.kb_windows``): windows of ``words`` words every ``stride`` words of each KB
  chunk join the training rows, labelled with their expert (``kind = window``). A window belongs to
  its chunk's context, so it goes where the context's questions went: windows of held-out (val/test)
  contexts are dropped, and the grouped split still holds.
- The retrieval teacher (``dataset.teacher``): for every row, the expert distribution retrieval
  routing gives (mean cosine of each expert's top-k chunks, softmax at a temperature; a window's own
  chunk left out). The router's loss distils it; synthetic questions it strongly contradicts
  (probability of their own label below ``drop_below``) are dropped from train.

The split is stratified by expert and grouped by ``context_id``: questions written from one context
are near-paraphrases of each other, so a context that straddled train and test would leak answers
into the score (the original project did exactly that). See :func:`assign_groups` for the rule.

Adding or removing an expert leaves the other experts' rows as they were: each expert's split, train
cap and window share are drawn from generators seeded by (seed, the expert's name) and count only its
own rows. (Only a question or window whose text another expert also has can change: a question under
two experts is dropped as ambiguous, and of two equal windows the first expert's is kept.) The teacher
is recomputed for every row (a new expert is a new column), but the encoder runs only on what it has
not seen: KB chunks and row texts embedded before come from ``results/cache/`` (:mod:`moegate.rowcache`;
``report.json`` → ``cache`` says how many were reused).
"""

from __future__ import annotations

import logging
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moegate.errors import MoegateError
from moegate.io import atomic_dir, atomic_path, read_table, read_text_csv, write_json, write_parquet
from moegate.layout import Layout

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# the dataset/{split}.parquet contract (docs/architecture.md)
COLUMNS = ["query", "expert", "label", "context_id", "cluster", "backend", "kind", "chunk"]
KINDS = ("question", "window")  # a synthesized/labelled question, or a window of KB text
WINDOW_BACKEND = "kb_window"
# what the stage needs from queries/{expert}.parquet
QUERY_COLUMNS = ("query", "expert", "cluster", "context_id", "backend")
CSV_COLUMNS = ("question", "expert")
CSV_BACKEND = "labelled_csv"  # the backend column of rows that came from a user's CSV
CSV_CLUSTER = -1  # a labelled CSV has no clusters
MIN_GROUPS_FOR_ALL_SPLITS = 3


class DatasetError(MoegateError, ValueError):
    """An input of the dataset stage is unusable; the message names the file and what was expected."""


# -- reading ------------------------------------------------------------------------------------
def read_queries(config: dict, layout: Layout) -> pd.DataFrame:
    """Concatenate ``queries/{expert}.parquet`` in config order; columns QUERY_COLUMNS, str/int typed."""
    frames = []
    for expert in config["experts"]:
        path = layout.queries(expert)
        try:
            frame = read_table(path, QUERY_COLUMNS, f"did `moegate synthesize --expert {expert}` run?")
        except (FileNotFoundError, ValueError) as e:
            raise DatasetError(str(e)) from None
        others = sorted(set(frame["expert"].astype(str)) - {expert})
        if others:
            raise DatasetError(f"{path}: expert column holds {others}, expected only {expert!r}")
        frame = frame[list(QUERY_COLUMNS)].copy()
        try:
            frame["cluster"] = frame["cluster"].astype("int64")
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: column 'cluster' must hold integers: {e}") from None
        frame["context_id"] = frame["context_id"].astype(str)
        frame["backend"] = frame["backend"].astype(str)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def read_labelled_csv(path: str | Path, experts: list[str], drop_unknown: bool = False) -> tuple[pd.DataFrame, int]:
    """A user's CSV → (rows in QUERY_COLUMNS form, count of rows dropped for an unknown expert).

    Needs ``question`` and ``expert`` columns; a ``context_id`` column, when present, groups rows
    for the split (a blank one makes the row its own group); without it every row is its own group.
    An expert label that is not in ``experts`` (compared exactly, after stripping spaces) is a
    DatasetError listing every such label with its row count, unless ``drop_unknown``
    (``dataset.drop_unknown_labels``) drops those rows.
    """
    path = Path(path)
    raw = read_text_csv(path, CSV_COLUMNS, "labelled CSV", "dataset.labelled_csv", DatasetError)
    row = pd.Series([f"csv/{i + 1}" for i in range(len(raw))], index=raw.index)  # 1 = first data row
    if "context_id" in raw.columns:
        given = raw["context_id"].str.strip()
        context = given.where(given != "", row)
    else:
        context = row
    frame = pd.DataFrame(
        {
            "query": raw["question"],
            "expert": raw["expert"].str.strip(),
            "cluster": CSV_CLUSTER,
            "context_id": context,
            "backend": CSV_BACKEND,
        }
    )
    known = frame["expert"].isin(experts)
    unknown = int((~known).sum())
    if unknown and not drop_unknown:
        raise DatasetError(f"{path}: {unknown} of {len(frame)} row(s) name an expert not in config.experts: "
                           f"{unknown_labels(frame.loc[~known, 'expert'], experts)}; fix the labels (they must "
                           f"match exactly), or set dataset.drop_unknown_labels: true to drop those rows")
    if unknown:
        log.warning("%s: dropped %d row(s) whose expert is not in config.experts (dataset.drop_unknown_labels): %s",
                    path, unknown, unknown_labels(frame.loc[~known, "expert"], experts))
    return frame[known].reset_index(drop=True), unknown


def unknown_labels(labels: pd.Series, experts: list[str], shown: int = 20) -> str:
    """``'E1' (3 rows, first in data row 2), ...``: the unknown labels, most frequent first, with a
    suggestion when one differs from an expert only in case."""
    by_case = {e.casefold(): e for e in experts}
    parts = []
    for label, count in labels.value_counts().head(shown).items():
        first = int(labels.index[labels == label][0]) + 1  # 1 = the first row after the header
        hint = f", did you mean {by_case[label.casefold()]!r}?" if label.casefold() in by_case else ""
        parts.append(f"{label!r} ({count} row(s), first in data row {first}{hint})")
    more = labels.nunique() - shown
    return ", ".join(parts) + (f" and {more} more label(s)" if more > 0 else "") + f" (known: {', '.join(experts)})"


# -- cleaning -----------------------------------------------------------------------------------
def normalise(text: Any) -> str:
    """Unicode NFKC, runs of whitespace collapsed to one space, stripped; non-strings become ''."""
    if not isinstance(text, str):
        return ""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def clean(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise queries, then drop empty ones, ambiguous ones and duplicates.

    A question (compared case-insensitively) that appears under two or more experts is ambiguous:
    every copy goes, since no label is right for it. Within one expert the first copy is kept.
    Returns the kept rows (original order) and counts: empty, ambiguous, duplicate (rows dropped)
    and ambiguous_questions (distinct questions behind the ambiguous rows).
    """
    frame = frame.assign(query=frame["query"].map(normalise))
    empty = frame["query"] == ""
    frame = frame[~empty]
    key = frame["query"].str.casefold()
    experts_per_key = frame.groupby(key)["expert"].nunique()
    ambiguous_keys = experts_per_key.index[experts_per_key > 1]
    ambiguous = key.isin(ambiguous_keys)
    frame, key = frame[~ambiguous], key[~ambiguous]
    duplicate = key.duplicated(keep="first")
    frame = frame[~duplicate].reset_index(drop=True)
    counts = {
        "empty": int(empty.sum()),
        "ambiguous": int(ambiguous.sum()),
        "duplicate": int(duplicate.sum()),
        "ambiguous_questions": len(ambiguous_keys),
    }
    return frame, counts


def check_groups(frame: pd.DataFrame, source: str) -> None:
    """A context group must belong to one expert, else grouping and stratifying contradict."""
    experts_per_group = frame.groupby("context_id")["expert"].unique()
    shared = experts_per_group[experts_per_group.map(len) > 1]
    if len(shared):
        cid, names = shared.index[0], sorted(shared.iloc[0])
        raise DatasetError(
            f"{source}: context_id {cid!r} appears under experts {names} ({len(shared)} such "
            "context_id(s)); a context group must belong to one expert"
        )


# -- splitting ----------------------------------------------------------------------------------
def assign_groups(sizes: list[int], fractions: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Assign one expert's context groups (``sizes[i]`` rows each) to splits; returns a split per group.

    Groups are shuffled with ``rng`` and then ordered largest first (so the shuffle decides among
    equal sizes, the common case). With >= 3 groups, val and test each first take one of the two
    smallest groups, so every split gets this expert without overshooting its small target. Every
    other group then goes to the split that is furthest below its target row count (lowest
    assigned/target; ties to train, then to the larger target). With 2 groups: train and the larger
    of val/test; with 1: train only (the caller reports such experts).
    """
    n = len(sizes)
    order = [int(i) for i in rng.permutation(n)]
    order.sort(key=lambda i: -sizes[i])  # stable: equal sizes keep their shuffled order
    total = float(sum(sizes))
    target = {s: fractions[s] * total for s in SPLITS}
    assigned = dict.fromkeys(SPLITS, 0.0)
    out: list[str] = [""] * n
    if n >= MIN_GROUPS_FOR_ALL_SPLITS:
        held_out = sorted(
            ("val", "test"), key=lambda s: target[s]
        )  # the smaller target takes the smallest group
        for split, i in zip(held_out, (order[-1], order[-2])):
            out[i] = split
            assigned[split] += sizes[i]
        order = order[:-2]
    for i in order:
        split = min(SPLITS, key=lambda s: (assigned[s] / target[s], s != "train", -target[s]))
        out[i] = split
        assigned[split] += sizes[i]
    return out


def split_fractions(config: dict) -> dict[str, float]:
    ds = config["dataset"]
    val, test = float(ds["val_fraction"]), float(ds["test_fraction"])
    return {"train": 1.0 - val - test, "val": val, "test": test}


def cap_train_rows(frame: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """Keep at most ``cap`` training rows per expert (a seeded sample; val and test are untouched).

    For CPU runs on big knowledge bases: fine-tuning time grows with the training rows, while the
    validation and test splits stay whole so the scores remain comparable.
    """
    if cap is None:
        return frame
    drop = []
    for expert, train in frame[frame["split"] == "train"].groupby("expert", sort=False):
        if len(train) > cap:
            rng = np.random.default_rng([seed, zlib.crc32(str(expert).encode()), 1])
            kept = rng.choice(train.index.to_numpy(), size=cap, replace=False)
            drop.extend(train.index.difference(kept))
    return frame.drop(index=drop)


def grouped_split(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """The split name of every row: stratified by ``expert``, grouped by ``context_id``.

    Each expert's groups are shuffled with a generator seeded by (seed, the expert's name), so
    adding an expert does not reshuffle the others.
    """
    split = pd.Series("", index=frame.index, dtype=object)
    for expert, rows in frame.groupby("expert", sort=False):
        sizes = rows.groupby("context_id", sort=True).size()  # sorted ids: independent of row order
        rng = np.random.default_rng([seed, zlib.crc32(str(expert).encode())])
        by_group = dict(zip(sizes.index, assign_groups(sizes.tolist(), fractions, rng)))
        split[rows.index] = rows["context_id"].map(by_group)
    return split


# -- the knowledge bases as training rows ---------------------------------------------------------
def text_windows(text: str, words: int, stride: int) -> list[str]:
    """Windows of ``words`` whitespace words every ``stride`` words; a text shorter than one window is
    one window; a trailing window shorter than half a window is left out (its words are in the last one)."""
    tokens = text.split()
    if len(tokens) <= words:
        return [" ".join(tokens)] if tokens else []
    out = []
    for start in range(0, len(tokens) - words + stride, stride):
        piece = tokens[start:start + words]
        if len(piece) < max(1, words // 2):
            break
        out.append(" ".join(piece))
    return out


def kb_windows(config: dict, layout: Layout, chunk_row: dict[str, int]) -> pd.DataFrame:
    """Every expert's KB chunks cut into windows (``dataset.kb_windows``), each labelled with its expert
    and its chunk's synthesize context (``context_id``, the same grouping as the questions).

    ``chunk_row``: KB index row of each chunk id (the teacher leaves a window's own chunk out).
    Chunks that belong to no context (noise dropped by the cluster stage) give no windows.
    """
    from moegate.stages.synthesize import build_contexts

    section = config["dataset"]["kb_windows"]
    words, stride = int(section["words"]), int(section["stride"])
    rows = []
    for expert in config["experts"]:
        kb = read_table(layout.kb(expert), ["id", "text"], f"run `moegate ingest --expert {expert}` first")
        clusters = read_table(layout.clusters(expert), ["id", "cluster"],
                              f"run `moegate cluster --expert {expert}` first")
        text = dict(zip(kb["id"].astype(str), kb["text"].astype(str)))
        for context in build_contexts(kb, clusters, expert, int(config["synthesize"]["context_tokens"]),
                                      str(layout.kb(expert)), str(layout.clusters(expert))):
            for chunk_id in context.chunk_ids:
                for window in text_windows(normalise(text[chunk_id]), words, stride):
                    rows.append((window, expert, context.cluster, context.context_id, WINDOW_BACKEND, "window",
                                 chunk_row.get(f"{expert}\x00{chunk_id}", -1)))
    return pd.DataFrame(rows, columns=["query", "expert", "cluster", "context_id", "backend", "kind", "chunk"])


def add_windows(frame: pd.DataFrame, windows: pd.DataFrame, max_share: float, seed: int,
                dropped: dict[str, int], split_of: pd.Series | None = None,
                train_questions: dict[str, int] | None = None) -> pd.DataFrame:
    """Join KB windows to the split questions: a window takes its context's split; windows of held-out
    contexts are dropped (``window_held_out``); windows of contexts no question came from go to train.
    Each expert keeps at most ``max_share`` of its training rows as windows (seeded sample;
    ``window_over_share``). Windows that repeat a question or another window are dropped too.
    ``split_of`` (context_id → split) and ``train_questions`` (expert → its training questions, for the
    share) default to ``frame``'s; the stage passes each expert's own, before questions shared with
    another expert were dropped, so another expert's questions do not move this expert's windows."""
    if split_of is None:
        split_of = frame.drop_duplicates("context_id").set_index("context_id")["split"]
    windows = windows.assign(split=windows["context_id"].map(split_of).fillna("train"))
    held_out = windows["split"] != "train"
    dropped["window_held_out"] = int(held_out.sum())
    windows = windows[~held_out]
    key = windows["query"].str.casefold()
    repeat = key.duplicated() | key.isin(set(frame["query"].str.casefold()))
    dropped["window_duplicate"] = int(repeat.sum())
    windows = windows[~repeat]
    keep = []
    for expert, part in windows.groupby("expert", sort=False):
        questions = (int(((frame["expert"] == expert) & (frame["split"] == "train")).sum())
                     if train_questions is None else int(train_questions.get(expert, 0)))
        cap = len(part) if max_share >= 1.0 or questions == 0 else int(max_share / (1.0 - max_share) * questions)
        if len(part) > cap:
            rng = np.random.default_rng([seed, zlib.crc32(str(expert).encode()), 2])
            part = part.loc[np.sort(rng.choice(part.index.to_numpy(), size=cap, replace=False))]
        keep.append(part)
    kept = pd.concat(keep) if keep else windows.iloc[:0]
    dropped["window_over_share"] = len(windows) - len(kept)
    return pd.concat([frame, kept], ignore_index=True)


def teacher_scores(config: dict, frame: pd.DataFrame, index, cache: Path | None = None) -> tuple[torch.Tensor, int]:
    """(rows, K) retrieval-routing scores of every row (its own chunk left out for a window), and how many
    rows' embeddings came from ``cache`` (a :mod:`moegate.rowcache` file keyed by the row's text; None:
    no cache). The scores are always recomputed: an added expert is a new column for every row."""
    from moegate import rowcache
    from moegate.retrieval import embed_queries, question_max_length

    meta = {**rowcache.encoder_identity(config["encoder"]["model"]), "max_length": question_max_length(config)}
    vectors, reused = rowcache.embed_with_cache(frame["query"].tolist(), cache, meta,
                                                lambda texts: embed_queries(texts, config).numpy())
    exclude = torch.tensor(frame["chunk"].to_numpy(dtype=np.int64))
    scores = index.expert_scores(torch.from_numpy(vectors), int(config["dataset"]["teacher"]["top_k"]), exclude=exclude)
    return scores, reused


def apply_teacher(frame: pd.DataFrame, teacher: torch.Tensor, scores: torch.Tensor, drop_below: float,
                  dropped: dict[str, int]) -> tuple[pd.DataFrame, torch.Tensor, dict]:
    """Drop the training questions whose teacher gives their own label less than ``drop_below``
    (``teacher_disagrees``); report how often retrieval routing agrees with the labels, per split and kind."""
    labels = torch.tensor(frame["label"].to_numpy(dtype=np.int64))
    own = teacher.gather(1, labels[:, None]).squeeze(1).numpy()
    agree = (scores.argmax(1) == labels).numpy()
    report = {"agreement": {}, "drop_below": drop_below}
    for split in SPLITS:
        for kind in KINDS:
            rows = ((frame["split"] == split) & (frame["kind"] == kind)).to_numpy()
            if rows.any():
                report["agreement"][f"{split}_{kind}"] = round(float(agree[rows].mean()), 4)
    drop = ((frame["split"] == "train") & (frame["kind"] == "question")).to_numpy() & (own < drop_below)
    dropped["teacher_disagrees"] = int(drop.sum())
    keep = ~drop
    return frame[keep].reset_index(drop=True), teacher[torch.from_numpy(keep)], report


# -- tokenizing ---------------------------------------------------------------------------------
def load_tokenizer(model: str):
    """The tokenizer of the configured backbone (``backbone.model``), resolved offline when possible."""
    from transformers import AutoTokenizer

    from moegate.encoder import resolve_model

    path = resolve_model(model)
    return AutoTokenizer.from_pretrained(path), path


def tokenize(
    queries: list[str],
    labels: list[int],
    tokenizer,
    max_length: int,
    batch_size: int = 1024,
    desc: str = "tokenize",
) -> tuple[dict, int]:
    """Pad/truncate to ``max_length``.

    Returns ({input_ids, attention_mask: [rows, max_length], labels: [rows]}, all int64) and the
    number of queries that were longer than ``max_length`` tokens.
    """
    import torch
    from tqdm.auto import tqdm

    ids, masks, truncated = [], [], 0
    for start in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", disable=None):
        batch = queries[start : start + batch_size]
        full = tokenizer(batch, truncation=False, verbose=False)["input_ids"]  # only to count truncation
        truncated += sum(len(x) > max_length for x in full)
        enc = tokenizer(
            batch, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        ids.append(enc["input_ids"].to(torch.int64))
        masks.append(enc["attention_mask"].to(torch.int64))
    empty = torch.zeros((0, max_length), dtype=torch.int64)
    tensors = {
        "input_ids": torch.cat(ids) if ids else empty,
        "attention_mask": torch.cat(masks) if masks else empty.clone(),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    return tensors, truncated


def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


# -- the stage ----------------------------------------------------------------------------------
def dataset(config: dict) -> dict:
    """Run the dataset stage for a validated config; writes the files above and returns the report.

    Every file goes into a temporary sibling of ``dataset/`` that replaces it whole at the end, so a
    killed stage never leaves new splits beside an old report (or an old KB index beside new splits)."""
    layout = Layout.from_config(config)
    with atomic_dir(layout.dataset) as staged:
        return _dataset(config, layout.staged(dataset_dir=staged))


def _dataset(config: dict, layout: Layout) -> dict:
    started = time.perf_counter()
    experts = list(config["experts"])
    ds = config["dataset"]
    dropped = {"unknown_expert": 0}

    if ds["labelled_csv"]:
        source, inputs = CSV_BACKEND, [str(ds["labelled_csv"])]
        frame, dropped["unknown_expert"] = read_labelled_csv(ds["labelled_csv"], experts,
                                                             ds["drop_unknown_labels"])
        rows_in = len(frame) + dropped["unknown_expert"]
    else:
        source, inputs = "synthesized", [str(layout.queries(e)) for e in experts]
        frame = read_queries(config, layout)
        rows_in = len(frame)

    rows_per_expert = frame["expert"].value_counts()
    frame["_row"] = np.arange(len(frame))  # each row's identity through cleaning
    # each expert's own rows, before questions it shares with another expert are dropped as ambiguous: its
    # split, train cap and window share are drawn from these, so adding or removing another expert moves none
    parts = [clean(part)[0] for _, part in frame.groupby("expert", sort=False)]
    own = pd.concat(parts, ignore_index=True) if parts else frame.iloc[:0]
    frame, counts = clean(frame)
    ambiguous_questions = counts.pop("ambiguous_questions")
    dropped.update(counts)
    if frame.empty:
        raise DatasetError(f"{', '.join(inputs)}: no usable questions left (dropped: {dropped})")
    check_groups(frame, ", ".join(inputs))
    empty = [e for e in experts if not (frame["expert"] == e).any()]
    if empty:  # it would stay in labels.json with no rows to learn it from
        why = [f"{e!r} ({n} row(s) in, all empty, ambiguous or duplicates)" if (n := int(rows_per_expert.get(e, 0)))
               else f"{e!r} (no rows in the input)" for e in empty]
        raise DatasetError(f"{', '.join(inputs)}: no usable question left for expert(s) {', '.join(why)}; "
                           "give them questions, or remove them from config.experts")

    label_of = {e: i for i, e in enumerate(experts)}
    frame["label"] = frame["expert"].map(label_of).astype("int64")
    fractions = split_fractions(config)
    own["split"] = grouped_split(own, fractions, int(config["seed"]))
    own = cap_train_rows(own, ds["max_train_rows_per_expert"], int(config["seed"]))
    own_split = own.drop_duplicates("context_id").set_index("context_id")["split"]  # a context: one expert
    frame["split"] = frame["context_id"].map(own_split)
    before = len(frame)
    frame = frame[frame["_row"].isin(own["_row"])].reset_index(drop=True)
    dropped["over_train_cap"] = before - len(frame)
    own_train = own[own["split"] == "train"].groupby("expert").size().to_dict()

    groups_per_expert = frame.groupby("expert")["context_id"].nunique().reindex(experts, fill_value=0)
    few = {e: int(n) for e, n in groups_per_expert.items() if n < MIN_GROUPS_FOR_ALL_SPLITS}
    for e, n in few.items():  # n >= 1: an expert without rows failed above
        log.warning("expert %s has only %d context group(s), so it is missing from some splits (needs >= %d for "
                    "train, val and test)", e, n, MIN_GROUPS_FOR_ALL_SPLITS)
    for split in SPLITS:
        if not (frame["split"] == split).any():
            raise DatasetError(
                f"dataset: the {split} split is empty: every expert has fewer than "
                f"{MIN_GROUPS_FOR_ALL_SPLITS} context groups ({few}); add questions or contexts"
            )

    frame["kind"], frame["chunk"] = "question", -1
    index, teacher, teacher_report = None, None, None
    cache_report: dict = {}  # what the encoder did not have to embed again (results/cache/)
    if not ds["labelled_csv"]:  # the KB stages ran: their chunks are rows too, and the teacher's index
        from moegate.retrieval import build_index, teacher_distribution

        kb_stats: dict = {}
        index = build_index(config, experts, layout, cache=True, stats=kb_stats)
        index.save(layout.kb_index)
        cache_report["kb_index"] = kb_stats
        if ds["kb_windows"]["enabled"]:
            chunk_row = {f"{experts[int(e)]}\x00{c}": i for i, (e, c) in enumerate(zip(index.expert, index.chunk_ids))}
            windows = kb_windows(config, layout, chunk_row)
            frame = add_windows(frame, windows.assign(label=windows["expert"].map(label_of).astype("int64")),
                                float(ds["kb_windows"]["max_share"]), int(config["seed"]), dropped,
                                split_of=own_split, train_questions=own_train)
        if ds["teacher"]["enabled"]:
            scores, reused = teacher_scores(config, frame, index, layout.row_embeddings_cache)
            cache_report["row_embeddings"] = {"rows": len(frame), "reused": reused}
            teacher = teacher_distribution(scores, float(ds["teacher"]["temperature"]))
            frame, teacher, teacher_report = apply_teacher(frame, teacher, scores, float(ds["teacher"]["drop_below"]),
                                                           dropped)
    elif ds["kb_windows"]["enabled"] or ds["teacher"]["enabled"]:
        log.info("dataset: labelled_csv given, so no KB windows and no retrieval teacher (they need the KB stages)")

    tokenizer, tokenizer_path = load_tokenizer(config["backbone"]["model"])
    max_length = int(ds["max_length"])
    splits_report, truncated_total = {}, 0
    for split in SPLITS:
        rows = (frame["split"] == split).to_numpy()
        part = frame[rows][COLUMNS].reset_index(drop=True)
        tensors, truncated = tokenize(
            part["query"].tolist(), part["label"].tolist(), tokenizer, max_length, desc=f"tokenize {split}"
        )
        if teacher is not None:
            tensors["teacher"] = teacher[torch.from_numpy(rows)].float().contiguous()
        write_parquet(layout.split(split), part)
        save_tensors(layout.tokens(split), tensors)
        truncated_total += truncated
        splits_report[split] = {
            "rows": len(part),
            "share": round(len(part) / len(frame), 4),
            "target_share": round(fractions[split], 4),
            "context_groups": int(part["context_id"].nunique()),
            "per_expert": {e: int((part["expert"] == e).sum()) for e in experts},
            "kind": {k: int((part["kind"] == k).sum()) for k in KINDS},
            "truncated": truncated,
        }
    write_json(layout.labels, {"labels": experts})

    report = {
        "source": source,
        "inputs": inputs,
        "rows_in": rows_in,
        "dropped": dropped,
        "ambiguous_questions": ambiguous_questions,
        "rows_out": len(frame),
        "labels": experts,
        "seed": int(config["seed"]),
        "splits": splits_report,
        "experts_with_few_groups": few,
        "max_length": max_length,
        "tokenizer": {
            "model": config["backbone"]["model"],
            "path": str(tokenizer_path),
            "class": type(tokenizer).__name__,
        },
        "truncated_share": round(truncated_total / len(frame), 4),
        "kb_index": None if index is None else {"chunks": len(index), "encoder": index.encoder},
        "teacher": teacher_report,
        "cache": cache_report,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    write_json(layout.dataset_report, report)
    log.info(
        "dataset: %d rows in, %d out (dropped %s); train/val/test = %s; %.1f%% truncated at %d tokens",
        rows_in,
        len(frame),
        dropped,
        "/".join(str(splits_report[s]["rows"]) for s in SPLITS),
        100 * report["truncated_share"],
        max_length,
    )
    return report
