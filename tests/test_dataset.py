"""The dataset stage on small hand-written queries files and labelled CSVs (no other stage needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from moegate.config import load
from moegate.layout import Layout
from moegate.stages.dataset import (
    COLUMNS,
    SPLITS,
    DatasetError,
    assign_groups,
    clean,
    dataset,
    grouped_split,
    normalise,
    read_labelled_csv,
)

EXPERTS = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]
TOPICS = {
    "dsci_101": "pandas dataframes",
    "dsci_dl_510": "convolutional networks",
    "dsci_vis_510": "bar charts",
}


def write_queries(
    results: Path, expert: str, contexts: int, per_context: int = 4, extra: list[str] = ()
) -> None:
    """queries/{expert}.parquet as synthesize writes it: `per_context` distinct questions per context."""
    rows = []
    for k in range(contexts):
        for j in range(per_context):
            rows.append(
                {
                    "query": f"Question {j} about {TOPICS[expert]} in context {k}?",
                    "cluster": k % 3,
                    "context_id": f"{expert}/{k % 3}/{k // 3}",  # synthesize's ids: cluster, then k-th context
                }
            )
    for q in extra:
        rows.append({"query": q, "cluster": 0, "context_id": f"{expert}/0/extra"})
    frame = pd.DataFrame(rows)
    frame["expert"] = expert
    frame["backend"] = "offline"
    frame["model"] = "offline-v1"
    path = Layout(results).queries(expert)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    write_kb(results, expert, contexts)


def write_kb(results: Path, expert: str, chunks: int) -> None:
    """kb/{expert}.parquet (a 4-d vector export: the retrieval index embeds its text again) and
    clusters/{expert}.parquet as the ingest and cluster stages write them: one chunk per context."""
    layout = Layout(results)
    words = " ".join(f"{TOPICS[expert].split()[0]} note {i}" for i in range(15))
    kb = pd.DataFrame({"id": [f"{expert}-{k}" for k in range(chunks)],
                       "text": [f"Chunk {k} on {TOPICS[expert]}: {words}" for k in range(chunks)],
                       "embedding": [np.full(4, 0.5, dtype=np.float32) for _ in range(chunks)], "source": "test"})
    layout.kb(expert).parent.mkdir(parents=True, exist_ok=True)
    kb.to_parquet(layout.kb(expert), index=False)
    layout.clusters(expert).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": kb["id"], "cluster": [k % 3 for k in range(chunks)], "probability": 1.0}).to_parquet(
        layout.clusters(expert), index=False)


def make_config(tmp_path: Path, **dataset_keys) -> dict:
    """The dataset section given; KB windows and the teacher off unless named (their own tests below)."""
    dataset_keys = {"kb_windows": {"enabled": False}, "teacher": {"enabled": False}, **dataset_keys}
    return load(write_config(tmp_path, dataset=dataset_keys))


# -- cleaning -----------------------------------------------------------------------------------
def test_normalise_nfkc_whitespace_and_non_strings():
    assert normalise("  What\tis\u00a0a\n\n ﬁle?  ") == "What is a file?"
    assert normalise("ＡＢＣ ①") == "ABC 1"
    assert normalise(None) == "" and normalise(float("nan")) == "" and normalise(" \t ") == ""


def test_clean_drops_empty_duplicates_and_ambiguous():
    frame = pd.DataFrame(
        {
            "query": [
                "What is a tensor?",
                "what is  a TENSOR?",
                "   ",
                "Shared question?",
                "shared QUESTION?",
                "Shared question?",
                "Only here?",
            ],
            "expert": ["a", "a", "a", "a", "b", "b", "b"],
            "context_id": ["a/0/0", "a/0/1", "a/0/2", "a/0/3", "b/0/0", "b/0/1", "b/0/2"],
        }
    )
    kept, counts = clean(frame)
    assert kept["query"].tolist() == ["What is a tensor?", "Only here?"]  # first copy kept, as written
    assert kept["context_id"].tolist() == ["a/0/0", "b/0/2"]
    assert counts == {"empty": 1, "ambiguous": 3, "duplicate": 1, "ambiguous_questions": 1}


# -- splitting ----------------------------------------------------------------------------------
FRACTIONS = {"train": 0.75, "val": 0.1, "test": 0.15}


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=60),
    seed=st.integers(0, 2**32 - 1),
    val=st.floats(0.02, 0.4),
    test=st.floats(0.02, 0.4),
)
def test_assign_groups_every_group_once_and_all_splits_from_three_groups(sizes, seed, val, test):
    fractions = {"train": 1 - val - test, "val": val, "test": test}
    out = assign_groups(sizes, fractions, np.random.default_rng(seed))
    assert len(out) == len(sizes) and set(out) <= set(SPLITS)
    if len(sizes) >= 3:
        assert set(out) == set(SPLITS)
    elif len(sizes) == 1:
        assert out == ["train"]
    else:
        assert "train" in out


def test_assign_groups_hits_target_fractions_with_many_equal_groups():
    for seed in range(20):
        out = assign_groups([8] * 200, FRACTIONS, np.random.default_rng(seed))
        shares = {s: out.count(s) / 200 for s in SPLITS}
        for s in SPLITS:
            assert abs(shares[s] - FRACTIONS[s]) <= 0.01, (seed, shares)


def random_frame(rng: np.random.Generator) -> pd.DataFrame:
    """Experts with groups of uneven size, rows interleaved: a hard case for grouping."""
    rows = []
    for expert in ("a", "b", "c"):
        for g in range(int(rng.integers(1, 25))):
            for j in range(int(rng.integers(1, 12))):
                rows.append({"query": f"{expert} {g} {j}", "expert": expert, "context_id": f"{expert}/{g}"})
    order = rng.permutation(len(rows))
    return pd.DataFrame([rows[i] for i in order]).reset_index(drop=True)


@pytest.mark.parametrize("seed", range(40))
def test_grouped_split_never_shares_a_context_and_covers_every_row(seed):
    frame = random_frame(np.random.default_rng(seed))
    split = grouped_split(frame, FRACTIONS, seed)
    assert len(split) == len(frame) and set(split) <= set(SPLITS)  # every row in exactly one split
    assert (frame.assign(split=split).groupby("context_id")["split"].nunique() == 1).all()
    groups = frame.groupby("expert")["context_id"].nunique()
    for expert, rows in frame.assign(split=split).groupby("expert"):
        if groups[expert] >= 3:
            assert set(rows["split"]) == set(SPLITS), expert


def test_grouped_split_is_stratified_by_expert():
    # one big and one small expert: each must be split near the target fractions on its own
    frame = pd.DataFrame(
        [{"expert": "big", "context_id": f"big/{g}"} for g in range(400) for _ in range(5)]
        + [{"expert": "small", "context_id": f"small/{g}"} for g in range(40) for _ in range(5)]
    )
    split = grouped_split(frame, FRACTIONS, seed=3)
    for expert in ("big", "small"):
        shares = split[frame["expert"] == expert].value_counts(normalize=True)
        for s in SPLITS:
            assert abs(shares[s] - FRACTIONS[s]) <= 0.03, (expert, shares.to_dict())


def test_grouped_split_depends_on_seed_not_row_order():
    frame = random_frame(np.random.default_rng(0))
    a = grouped_split(frame, FRACTIONS, seed=1)
    shuffled = frame.sample(frac=1.0, random_state=5)
    b = grouped_split(shuffled, FRACTIONS, seed=1).reindex(frame.index)
    assert a.equals(b)
    assert not a.equals(grouped_split(frame, FRACTIONS, seed=2))


# -- the stage on synthesized queries -----------------------------------------------------------
def test_dataset_writes_splits_labels_tokens_and_report(tmp_path):
    config = make_config(tmp_path, max_length=16)
    results = Path(config["results"])
    long_question = "Why " + " ".join(["gradient"] * 40) + "?"
    write_queries(results, "dsci_101", contexts=20, extra=["What is a tensor?", "  what IS a tensor? "])
    write_queries(results, "dsci_dl_510", contexts=30, extra=["What is a tensor?", long_question])
    write_queries(results, "dsci_vis_510", contexts=10, extra=["", "How do I label an axis?"])
    report = dataset(config)
    layout = Layout(results)

    assert json.loads(layout.labels.read_text()) == {"labels": EXPERTS}
    assert report["rows_in"] == 80 + 120 + 40 + 6
    assert report["dropped"] == {"unknown_expert": 0, "empty": 1, "ambiguous": 3, "duplicate": 0,
                                "over_train_cap": 0}
    assert report["ambiguous_questions"] == 1
    assert report["rows_out"] == report["rows_in"] - 4

    splits = {s: pd.read_parquet(layout.split(s)) for s in SPLITS}
    assert sum(len(f) for f in splits.values()) == report["rows_out"]
    contexts = {s: set(f["context_id"]) for s, f in splits.items()}
    assert not (
        contexts["train"] & contexts["val"]
        or contexts["train"] & contexts["test"]
        or contexts["val"] & contexts["test"]
    )
    for s, f in splits.items():
        assert list(f.columns) == COLUMNS
        assert f["label"].dtype == np.int64 and (f["label"] == f["expert"].map(EXPERTS.index)).all()
        assert set(f["expert"]) == set(EXPERTS)  # every expert has >= 3 groups, so it is in every split
        assert report["splits"][s]["rows"] == len(f)
        assert report["splits"][s]["per_expert"] == {e: int((f["expert"] == e).sum()) for e in EXPERTS}
    assert abs(report["splits"]["train"]["share"] - 0.75) < 0.08

    from transformers import AutoTokenizer

    from moegate.encoder import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
    for s, f in splits.items():
        t = load_file(str(layout.tokens(s)))
        assert set(t) == {"input_ids", "attention_mask", "labels"}  # no teacher when it is off
        assert t["input_ids"].shape == t["attention_mask"].shape == (len(f), 16)
        assert all(v.dtype == torch.int64 for v in t.values())
        assert t["labels"].tolist() == f["label"].tolist()
        first = tokenizer.decode(t["input_ids"][0][t["attention_mask"][0].bool()], skip_special_tokens=True)
        assert first.split()[:2] == f["query"].iloc[0].lower().split()[:2]
    assert report["truncated_share"] == pytest.approx(1 / report["rows_out"], abs=1e-4)
    assert report["max_length"] == 16 and report["tokenizer"]["class"].endswith("Tokenizer")


def test_dataset_is_deterministic_for_a_seed(tmp_path):
    results = tmp_path / "results"
    for e, n in zip(EXPERTS, (12, 15, 9)):
        write_queries(results, e, contexts=n)
    config = make_config(tmp_path)
    dataset(config)
    first = {s: pd.read_parquet(Layout(results).split(s)) for s in SPLITS}
    first_tokens = load_file(str(Layout(results).tokens("train")))
    dataset(config)
    for s in SPLITS:
        pd.testing.assert_frame_equal(first[s], pd.read_parquet(Layout(results).split(s)))
    assert (first_tokens["input_ids"] == load_file(str(Layout(results).tokens("train")))["input_ids"]).all()
    dataset({**config, "seed": 7})
    assert set(first["test"]["context_id"]) != set(
        pd.read_parquet(Layout(results).split("test"))["context_id"]
    )


def test_max_train_rows_per_expert_caps_train_only(tmp_path):
    results = tmp_path / "results"
    for e, n in zip(EXPERTS, (40, 12, 20)):
        write_queries(results, e, contexts=n)
    whole = dataset(make_config(tmp_path))
    capped = dataset(make_config(tmp_path, max_train_rows_per_expert=30))
    train = pd.read_parquet(Layout(results).split("train"))
    counts = train["expert"].value_counts().to_dict()
    full = whole["splits"]["train"]["per_expert"]
    assert counts == {e: min(30, full[e]) for e in EXPERTS}
    assert capped["dropped"]["over_train_cap"] == sum(max(0, full[e] - 30) for e in EXPERTS) > 0
    for s in ("val", "test"):  # untouched
        for key in ("rows", "per_expert", "context_groups"):
            assert capped["splits"][s][key] == whole["splits"][s][key]
    assert len(load_file(str(Layout(results).tokens("train")))["labels"]) == len(train)


def test_dataset_with_another_backbone_tokenizer(tmp_path, tiny_distilbert_dir):
    results = tmp_path / "results"
    for e in EXPERTS:
        write_queries(results, e, contexts=4, per_context=2)
    config = load(
        write_config(tmp_path, backbone={"model": str(tiny_distilbert_dir)}, dataset={"max_length": 8})
    )
    report = dataset(config)
    assert report["tokenizer"]["path"] == str(tiny_distilbert_dir)
    t = load_file(str(Layout(results).tokens("val")))
    assert t["input_ids"].shape == (report["splits"]["val"]["rows"], 8)


def test_missing_or_malformed_queries_file_is_named(tmp_path):
    config = make_config(tmp_path)
    results = Path(config["results"])
    write_queries(results, "dsci_101", contexts=5)
    write_queries(results, "dsci_dl_510", contexts=5)
    with pytest.raises(
        DatasetError, match=r"queries/dsci_vis_510\.parquet: missing \(did `moegate synthesize"
    ):
        dataset(config)
    pd.DataFrame({"query": ["q?"], "expert": ["dsci_vis_510"]}).to_parquet(
        Layout(results).queries("dsci_vis_510")
    )
    with pytest.raises(
        DatasetError, match=r"dsci_vis_510\.parquet: missing column\(s\) \['cluster', 'context_id'"
    ):
        dataset(config)


def test_too_few_groups_everywhere_is_a_clear_error(tmp_path):
    config = make_config(tmp_path)
    for e in EXPERTS:
        write_queries(Path(config["results"]), e, contexts=2)
    with pytest.raises(DatasetError, match="the val split is empty"):
        dataset(config)


def test_expert_with_few_groups_is_reported(tmp_path):
    config = make_config(tmp_path)
    results = Path(config["results"])
    write_queries(results, "dsci_101", contexts=10)
    write_queries(results, "dsci_dl_510", contexts=10)
    write_queries(results, "dsci_vis_510", contexts=1)
    report = dataset(config)
    assert report["experts_with_few_groups"] == {"dsci_vis_510": 1}
    assert report["splits"]["train"]["per_expert"]["dsci_vis_510"] == 4
    assert report["splits"]["test"]["per_expert"]["dsci_vis_510"] == 0


# -- the stage on a user's labelled CSV ---------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_labelled_csv_skips_bad_rows_and_makes_each_row_a_group(tmp_path):
    rows = [{"question": f"How does {e} topic {i} work?", "expert": e} for e in EXPERTS for i in range(10)]
    rows += [
        {"question": "", "expert": "dsci_101"},
        {"question": "Stray?", "expert": "history"},
        {"question": "Who knows?", "expert": "dsci_101"},
        {"question": "who knows?", "expert": "dsci_vis_510"},
        {"question": "How does dsci_101 topic 1 work?", "expert": " dsci_101 "},
    ]
    csv = write_csv(tmp_path / "labelled.csv", rows)
    with pytest.raises(DatasetError, match=r"labelled\.csv: 1 of 35 row\(s\) name an expert not in config\.experts: "
                                           r"'history' \(1 row\(s\), first in data row 32\)"):
        dataset(make_config(tmp_path, labelled_csv=str(csv)))
    report = dataset(make_config(tmp_path, labelled_csv=str(csv), drop_unknown_labels=True))
    assert report["source"] == "labelled_csv" and report["inputs"] == [str(csv)]
    assert report["rows_in"] == 35
    assert report["dropped"] == {"unknown_expert": 1, "empty": 1, "ambiguous": 2, "duplicate": 1,
                                "over_train_cap": 0}
    assert report["rows_out"] == 30
    layout = Layout(tmp_path / "results")
    frames = pd.concat([pd.read_parquet(layout.split(s)) for s in SPLITS])
    assert frames["context_id"].is_unique and frames["context_id"].str.fullmatch(r"csv/\d+").all()
    assert set(frames["backend"]) == {"labelled_csv"} and set(frames["cluster"]) == {-1}
    for s in SPLITS:
        assert report["splits"][s]["rows"] > 0


def test_labelled_csv_context_id_column_groups_rows(tmp_path):
    rows = [
        {"question": f"{e} question {g}.{j}?", "expert": e, "context_id": f"{e}-passage-{g}"}
        for e in EXPERTS
        for g in range(6)
        for j in range(3)
    ]
    rows.append({"question": "A loose question?", "expert": "dsci_101", "context_id": ""})
    csv = write_csv(tmp_path / "labelled.csv", rows)
    dataset(make_config(tmp_path, labelled_csv=str(csv)))
    layout = Layout(tmp_path / "results")
    frames = pd.concat([pd.read_parquet(layout.split(s)).assign(split=s) for s in SPLITS])
    assert (frames.groupby("context_id")["split"].nunique() == 1).all()
    sizes = frames.groupby("context_id").size()
    assert sizes[~sizes.index.str.startswith("csv/")].eq(3).all() and len(sizes) == len(EXPERTS) * 6 + 1
    assert frames.loc[frames["query"] == "A loose question?", "context_id"].item() == f"csv/{len(rows)}"


def test_labelled_csv_errors_name_the_file_and_column(tmp_path):
    experts = EXPERTS
    bad = write_csv(tmp_path / "bad.csv", [{"text": "What?", "expert": "dsci_101"}])
    with pytest.raises(DatasetError, match=r"bad\.csv: missing column\(s\) \['question'\]"):
        read_labelled_csv(bad, experts)
    with pytest.raises(DatasetError, match=r"nowhere\.csv: labelled CSV not found"):
        read_labelled_csv(tmp_path / "nowhere.csv", experts)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"empty\.csv: not a readable CSV"):
        read_labelled_csv(empty, experts)
    shared = write_csv(
        tmp_path / "shared.csv",
        [{"question": f"q{i}?", "expert": EXPERTS[i % 2], "context_id": "p1"} for i in range(4)],
    )
    with pytest.raises(DatasetError, match=r"shared\.csv: context_id 'p1' appears under experts"):
        dataset(make_config(tmp_path, labelled_csv=str(shared)))


def test_cli_runs_the_stage(tmp_path):
    from typer.testing import CliRunner

    from moegate.cli import app

    path = write_config(tmp_path)
    for e in EXPERTS:
        write_queries(tmp_path / "results", e, contexts=5)
    result = CliRunner().invoke(app, ["dataset", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert Layout(tmp_path / "results").dataset_report.exists()


# -- the knowledge bases as rows: windows and the retrieval teacher ---------------------------------
def test_text_windows_cover_the_text():
    from moegate.stages.dataset import text_windows

    words = [f"w{i}" for i in range(50)]
    windows = text_windows(" ".join(words), 20, 10)
    assert windows[0].split() == words[:20] and windows[-1].split()[-1] == "w49"
    assert [len(w.split()) for w in windows] == [20, 20, 20, 20]
    assert text_windows("short text", 20, 10) == ["short text"] and text_windows("   ", 20, 10) == []


def test_windows_follow_their_context_and_the_teacher_scores_every_row(tmp_path):
    results = tmp_path / "results"
    for e, n in zip(EXPERTS, (12, 15, 9)):
        write_queries(results, e, contexts=n)
    config = load(write_config(  # a context a chunk, so windows and questions share context ids
        tmp_path, synthesize={"context_tokens": 60},
        dataset={"kb_windows": {"enabled": True, "words": 8, "stride": 4, "max_share": 0.5},
                 "teacher": {"enabled": True, "top_k": 2, "temperature": 0.05, "drop_below": 0.0}}))
    report = dataset(config)
    layout = Layout(results)
    splits = {s: pd.read_parquet(layout.split(s)) for s in SPLITS}
    train = splits["train"]
    windows = train[train["kind"] == "window"]
    assert len(windows) > 0 and (windows["backend"] == "kb_window").all() and (windows["chunk"] >= 0).all()
    for s in ("val", "test"):  # windows only train, and never from a held-out context
        assert (splits[s]["kind"] == "question").all()
        assert not set(windows["context_id"]) & set(splits[s]["context_id"])
    assert report["dropped"]["window_held_out"] > 0
    for e in EXPERTS:  # max_share 0.5: at most as many windows as questions per expert
        part = train[train["expert"] == e]
        assert (part["kind"] == "window").sum() <= (part["kind"] == "question").sum()
    assert report["splits"]["train"]["kind"]["window"] == len(windows)
    for s in SPLITS:
        t = load_file(str(layout.tokens(s)))
        assert t["teacher"].shape == (len(splits[s]), 3)
        torch.testing.assert_close(t["teacher"].sum(1), torch.ones(len(splits[s])))
    assert set(report["teacher"]["agreement"]) >= {"train_question", "train_window", "val_question"}
    from moegate.retrieval import KBIndex

    index = KBIndex.load(layout.kb_index)
    assert index.labels == EXPERTS and len(index) == 12 + 15 + 9 and index.vectors.shape[1] == 384
    torch.testing.assert_close(index.vectors.norm(dim=1), torch.ones(len(index)))


def test_teacher_drop_below_removes_contradicted_training_questions(tmp_path):
    results = tmp_path / "results"
    wrong = [f"Question {i} about bar charts and bar charts?" for i in range(30)]  # dsci_vis_510's topic
    for e, n in zip(EXPERTS, (12, 15, 9)):
        write_queries(results, e, contexts=n, extra=wrong if e == "dsci_101" else ())
    keep = dataset(make_config(tmp_path, teacher={"enabled": True, "drop_below": 0.0}))
    drop = dataset(make_config(tmp_path, teacher={"enabled": True, "drop_below": 0.5}))
    assert keep["dropped"]["teacher_disagrees"] == 0 < drop["dropped"]["teacher_disagrees"]
    assert drop["splits"]["train"]["rows"] == keep["splits"]["train"]["rows"] - drop["dropped"]["teacher_disagrees"]
    for key in ("rows", "per_expert"):  # only training questions are dropped
        assert drop["splits"]["val"][key] == keep["splits"]["val"][key]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_dataset_stage_leaves_the_previous_dataset_whole(tmp_path, monkeypatch):
    import moegate.stages.dataset as stage

    results = tmp_path / "results"
    for e, n in zip(EXPERTS, (12, 15, 9)):
        write_queries(results, e, contexts=n)
    config = make_config(tmp_path)
    dataset(config)
    before = _snapshot(Layout(results).dataset)
    write_json = stage.write_json

    def fail_at_report(path, obj):
        if path.name == "report.json":
            raise KeyboardInterrupt("killed")
        write_json(path, obj)

    monkeypatch.setattr(stage, "write_json", fail_at_report)
    with pytest.raises(KeyboardInterrupt):
        dataset({**config, "seed": 7})
    assert _snapshot(Layout(results).dataset) == before
    assert not [p.name for p in results.iterdir() if p.name.startswith(".")]  # its temporary directory is gone


@pytest.mark.slow
def test_a_killed_dataset_stage_leaves_the_previous_dataset_whole(tmp_path):
    """SIGKILL after the new splits and tokens are written, before the report: dataset/ is still the old run's,
    every file of it, never new splits beside an old report."""
    from kills import run, run_and_kill

    results = tmp_path / "results"
    for e, n in zip(EXPERTS, (12, 15, 9)):
        write_queries(results, e, contexts=n)
    off = {"kb_windows": {"enabled": False}, "teacher": {"enabled": False}}
    dataset(load(write_config(tmp_path, dataset=off)))
    layout = Layout(results)
    before = _snapshot(layout.dataset)
    assert {"train.parquet", "report.json", "labels.json", "tokenized/test.safetensors"} <= set(before)

    config = write_config(tmp_path, dataset=off, seed=7)  # other splits
    hold_at_report = """
import moegate.stages.dataset as stage
_write_json = stage.write_json
def write_json(path, obj):
    if path.name == "report.json":
        pause_here()
    return _write_json(path, obj)
stage.write_json = write_json
"""
    run_and_kill(["dataset", "--config", str(config)], hold_at_report, tmp_path / "at-report", tmp_path / "killed.log")
    assert _snapshot(layout.dataset) == before
    run(["dataset", "--config", str(config)], tmp_path / "rerun.log")
    after = _snapshot(layout.dataset)
    assert set(after) == set(before) and after["test.parquet"] != before["test.parquet"]
    assert json.loads(after["report.json"])["seed"] == 7
