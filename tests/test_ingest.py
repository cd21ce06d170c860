"""The ingest stage: vector exports (JSONL, JSON array, Parquet) and folders of documents."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DEMO, write_config
from typer.testing import CliRunner

from moegate.cli import app
from moegate.config import load
from moegate.documents import clean_html, clean_markdown
from moegate.encoder import embed, resolve_model
from moegate.layout import Layout
from moegate.stages.ingest import (
    IngestError,
    chunk_document,
    embed_cached,
    ingest,
    token_windows,
)

DIM = 8


def _rows(n: int = 6, dim: int = DIM, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"c{i}", "text": f"chunk number {i} about topic {i % 3}",
             "embedding": rng.normal(size=dim).round(5).tolist()} for i in range(n)]


def _config(tmp_path: Path, sources: dict[str, Path], **sections) -> dict:
    experts = {name: {"source": str(src)} for name, src in sources.items()}
    if len(experts) < 2:  # the schema wants at least two experts; a demo one fills the gap
        experts["other"] = {"source": str(DEMO / "dsci_vis_510_data.jsonl")}
    return load(write_config(tmp_path, experts=experts, **sections))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kb(config: dict, expert: str) -> pd.DataFrame:
    return pd.read_parquet(Layout.from_config(config).kb(expert))


# -- vector exports ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_vector_export_formats(tmp_path, fmt):
    rows = _rows()
    path = tmp_path / f"kb.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    config = _config(tmp_path, {"course": path})
    report = ingest(config, "course")

    kb = _kb(config, "course")
    assert list(kb.columns) == ["id", "text", "embedding", "source"]
    assert kb["id"].tolist() == [r["id"] for r in rows]
    assert kb["text"].tolist() == [r["text"] for r in rows]
    vectors = np.stack(kb["embedding"].to_numpy())
    assert vectors.dtype == np.float32 and vectors.shape == (6, DIM)
    np.testing.assert_allclose(vectors, np.array([r["embedding"] for r in rows]), rtol=1e-6)
    assert pq.read_schema(Layout.from_config(config).kb("course")).field("embedding").type == pa.list_(pa.float32())
    assert set(kb["source"]) == {str(path)}
    on_disk = json.loads(Layout.from_config(config).kb_report("course").read_text())
    assert on_disk == report
    assert (report["kind"], report["format"], report["rows_read"], report["rows_kept"], report["dim"]) == (
        "vector_export", fmt, 6, 6, DIM)
    assert report["skipped"] == {}


def test_each_bad_row_reason_is_counted(tmp_path):
    good = _rows(5)
    bad = [
        {"id": "no-text", "embedding": [0.1] * DIM},
        {"id": "blank-text", "text": "   ", "embedding": [0.1] * DIM},
        {"id": "number-text", "text": 42, "embedding": [0.1] * DIM},
        {"text": "no id", "embedding": [0.1] * DIM},
        {"id": "  ", "text": "blank id", "embedding": [0.1] * DIM},
        {"id": "no-embedding", "text": "x"},
        {"id": "empty-embedding", "text": "x", "embedding": []},
        {"id": "string-embedding", "text": "x", "embedding": "0.1, 0.2"},
        {"id": "word-in-embedding", "text": "x", "embedding": [0.1] * (DIM - 1) + ["a"]},
        {"id": "bool-embedding", "text": "x", "embedding": [True] * DIM},
        {"id": "one-true-in-embedding", "text": "x", "embedding": [0.1] * (DIM - 1) + [True]},
        {"id": "nested-embedding", "text": "x", "embedding": [[0.1] * DIM]},
        {"id": "huge-int", "text": "x", "embedding": [0.1] * (DIM - 1) + [10**400]},
        {"id": "beyond-float32", "text": "x", "embedding": [0.1] * (DIM - 1) + [1e300]},
        {"id": "c0", "text": "duplicate of the first row", "embedding": [0.2] * DIM},
    ]
    path = tmp_path / "kb.jsonl"
    lines = [json.dumps(r) for r in good + bad]
    lines.append('{"id": "nan", "text": "x", "embedding": [NaN' + ", 0.1" * (DIM - 1) + "]}")
    lines.append('{"id": "inf", "text": "x", "embedding": [Infinity' + ", 0.1" * (DIM - 1) + "]}")
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a row
    config = _config(tmp_path, {"course": path})
    report = ingest(config, "course")

    assert report["rows_read"] == len(good) + len(bad) + 2
    assert report["rows_kept"] == 5 and report["dim"] == DIM
    assert report["skipped"] == {
        "duplicate_id": 1, "missing_embedding": 2, "missing_id": 2, "missing_text": 3,
        "non_finite_embedding": 2, "non_numeric_embedding": 5, "out_of_range_embedding": 2,
    }
    assert set(report["skip_reasons"]) == set(report["skipped"])
    assert report["skipped_examples"]["duplicate_id"] == ["line 20 (id 'c0')"]
    assert "line 16 (id 'one-true-in-embedding')" in report["skipped_examples"]["non_numeric_embedding"]
    assert report["skipped_examples"]["out_of_range_embedding"] == ["line 18 (id 'huge-int')",
                                                                  "line 19 (id 'beyond-float32')"]
    assert "line 9" in report["skipped_examples"]["missing_id"]
    kb = _kb(config, "course")
    assert kb["id"].tolist() == [f"c{i}" for i in range(5)]
    assert kb.loc[0, "text"] == good[0]["text"]  # the first of two rows with one id wins


def test_embeddings_of_two_lengths_are_an_error(tmp_path):
    rows = _rows(3, dim=4) + [dict(r, id=f"w{i}") for i, r in enumerate(_rows(5, dim=6, seed=1))]
    config = _config(tmp_path, {"course": _write_jsonl(tmp_path / "kb.jsonl", rows)})
    with pytest.raises(IngestError, match=r"kb.jsonl: embeddings of 2 different lengths: 6 \(5 row\(s\), first at "
                                          r"line 4\), 4 \(3 row\(s\), first at line 1\)"):
        ingest(config, "course")
    assert not Layout.from_config(config).kb_report("course").exists()


def test_parquet_bad_rows_and_numpy_embeddings(tmp_path):
    table = pa.table({
        "id": ["a", "b", "c", None],
        "text": ["alpha", "beta", None, "delta"],
        "embedding": pa.array([[0.1, 0.2], [float("nan"), 0.2], [0.3, 0.4], [0.5, 0.6]], pa.list_(pa.float64())),
    })
    path = tmp_path / "kb.parquet"
    pq.write_table(table, path)
    config = _config(tmp_path, {"course": path})
    report = ingest(config, "course")
    assert report["skipped"] == {"missing_id": 1, "missing_text": 1, "non_finite_embedding": 1}
    assert _kb(config, "course")["id"].tolist() == ["a"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "kb.jsonl"
    lines = [json.dumps(r) for r in _rows(3)]
    lines.insert(2, '{"id": "broken", "text": "x", "embedding": [0.1, ')
    path.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, {"course": path})
    with pytest.raises(IngestError, match=rf"{path}: line 3: not valid JSON"):
        ingest(config, "course")
    assert not Layout.from_config(config).kb("course").exists()


@pytest.mark.parametrize("name,content,message", [
    ("kb.jsonl", "[1, 2]\n", r"line 1: expected a JSON object"),
    ("kb.json", '{"id": "a"}', r"expected a JSON array of objects"),
    ("kb.json", "[{]", r"not valid JSON"),
    ("kb.parquet", "this is not parquet", r"cannot read as Parquet"),
    ("kb.csv", "id,text\n", r"unknown vector export type '.csv'"),
])
def test_unreadable_export_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(IngestError, match=rf"{path}: .*{message}"):
        ingest(_config(tmp_path, {"course": path}), "course")


def test_parquet_missing_column_and_non_utf8(tmp_path):
    path = tmp_path / "kb.parquet"
    pd.DataFrame({"id": ["a"], "text": ["x"]}).to_parquet(path)
    with pytest.raises(IngestError, match=rf"{path}: missing column\(s\) embedding"):
        ingest(_config(tmp_path, {"course": path}), "course")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "a", "text": "caf\xe9", "embedding": [1.0]}\n')
    with pytest.raises(IngestError, match=rf"{latin}: not UTF-8"):
        ingest(_config(tmp_path, {"course": latin}), "course")


def test_expert_without_usable_rows_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "kb.jsonl", [{"id": "a", "text": "", "embedding": [1.0]},
                                                {"id": "b", "text": "x", "embedding": None}])
    config = _config(tmp_path, {"course": path})
    with pytest.raises(IngestError, match=r"'course': .*no usable rows \(2 read; skipped: missing_embedding 1, "
                                          r"missing_text 1\)"):
        ingest(config, "course")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(IngestError, match="the export is empty"):
        ingest(_config(tmp_path, {"course": empty}), "course")
    assert not Layout.from_config(config).kb_report("course").exists()


def test_missing_source_and_unknown_expert(tmp_path):
    config = _config(tmp_path, {"course": tmp_path / "nowhere.jsonl"})
    with pytest.raises(IngestError, match=r"'course': source .*nowhere.jsonl does not exist"):
        ingest(config, "course")
    with pytest.raises(IngestError, match=r"'physics' is not in config.experts \(known: course, other\)"):
        ingest(config, "physics")


# -- documents: cleaning -----------------------------------------------------------------------

MARKDOWN = """---
title: "Measurements"
layout: page
---

<div data-type="abstract" markdown="1">
By the end of this section, you will be able to:
* Explain the process of **measurement**{: data-type="term"}
</div>

### Units   {#eip-177}

The mass is 2.98 <math xmlns="http://www.w3.org/1998/Math/MathML"><semantics><mrow><mn>2.98</mn><mo>×</mo>\
<msup><mn>10</mn><mn>5</mn></msup></mrow><annotation encoding="StarMath 5.0"> size 12{2.98 times 10^5} {}\
</annotation></semantics></math>

 kg, see [Appendix B](/m51211){: .target-chapter} and <sup>3</sup>H&amp;E.

![A nurse taking a patient&#x2019;s blood pressure (credit: Bryan Mason)](../resources/100_Blood(1).jpg "A \
proficiency in anatomy
is fundamental."){: #fig-1 data-title="x"}

<table summary="a table"><tr><td>kilogram</td><td>kg</td></tr></table>
<!-- an editor's comment -->
Final sentence with *emphasis* and `code`.
"""


def test_clean_markdown_keeps_readable_text():
    text = clean_markdown(MARKDOWN)
    for gone in ("title:", "layout", "<", ">", "{:", "{#", "](", "![", "nurse", "proficiency", "StarMath",
                 "size 12", "**", "`", "editor", "&amp;", "###"):
        assert gone not in text, gone
    assert text.startswith("By the end of this section, you will be able to:\nExplain the process of measurement")
    assert "The mass is 2.98 2.98 × 10^5 kg, see Appendix B and ^3H&E." in text
    assert "Units" in text and "kilogram" in text and "kg" in text
    assert text.endswith("Final sentence with emphasis and code.")
    assert "\n\n\n" not in text


def test_mathml_becomes_linear_text():
    ns = 'xmlns="http://www.w3.org/1998/Math/MathML"'
    speed = (f"<math {ns}><mrow><mi>v</mi><mo>=</mo><mfrac><mrow><mtext>Δ</mtext><mi>x</mi></mrow>"
             "<mrow><mi>t</mi></mrow></mfrac></mrow></math>\n\n is the speed and")
    assert clean_markdown(speed) == "v = (Δx)/(t) is the speed and"
    area = f"An area <math {ns}><msup><mi>r</mi><mn>2</mn></msup><msub><mi>x</mi><mn>0</mn></msub></math>. Next"
    assert clean_markdown(area) == "An area r^2x0. Next"
    display = f"Newton wrote <math {ns}><mi>F</mi><mo>=</mo><mi>m</mi><mi>a</mi></math>\n\nThe next paragraph."
    assert clean_markdown(display) == "Newton wrote F = ma\n\nThe next paragraph."
    broken = f"Broken <math {ns}><mi>a</mi><mo>&nbsp;+</mo><mi>b</mi></math> here"  # not XML: tokens only
    assert clean_markdown(broken) == "Broken a + b here"


def test_clean_html_drops_scripts_and_tags():
    page = ("<html><head><title>T</title><style>p {color: red}</style></head><body><h1>Cells</h1>"
            "<p>A cell&nbsp;is <em>small</em>.</p><script>var x = 1;</script><p>H<sub>2</sub>O</p></body></html>")
    assert clean_html(page) == "Cells\n\nA cell is small.\n\nH2O"


# -- documents: chunking -----------------------------------------------------------------------


def test_token_windows_overlap_and_trailing_merge():
    n = 100
    windows = token_windows([True] * n, [False] * n, chunk_tokens=30, overlap=10, min_chunk_tokens=5)
    assert windows[0] == (0, 30)
    for (a1, b1), (a2, b2) in itertools.pairwise(windows):
        assert b1 - a2 == 10  # every word is one token here, so the overlap is exact
        assert b2 - a2 <= 30 + 5
    assert windows[-1][1] == n
    # a last window of fewer than min_chunk_tokens new tokens joins the one before
    merged = token_windows([True] * 62, [False] * 62, chunk_tokens=30, overlap=10, min_chunk_tokens=5)
    assert merged == [(0, 30), (20, 50), (40, 62)]
    kept = token_windows([True] * 62, [False] * 62, chunk_tokens=30, overlap=10, min_chunk_tokens=1)
    assert kept == [(0, 30), (20, 50), (40, 62)]
    tail = token_windows([True] * 53, [False] * 53, chunk_tokens=30, overlap=10, min_chunk_tokens=5)
    assert tail == [(0, 30), (20, 53)]


def test_token_windows_prefer_sentence_ends_and_word_starts():
    n = 80
    sentence_end = [False] * n
    sentence_end[25] = True  # a sentence ends after token 25, inside the last quarter of window 1
    windows = token_windows([True] * n, sentence_end, chunk_tokens=30, overlap=8, min_chunk_tokens=1)
    assert windows[0] == (0, 26) and windows[1][0] == 18
    # tokens 19..21 continue a word: the second window starts back at its first token
    word_start = [True] * n
    word_start[19:22] = [False] * 3
    windows = token_windows(word_start, [False] * n, chunk_tokens=30, overlap=10, min_chunk_tokens=1)
    assert windows[1][0] == 18


def test_chunk_document_overlap_with_real_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
    words = ["photosynthesis", "converts", "light", "energy", "into", "chemical", "bonds", "inside", "leaves"]
    text = " ".join(words[i % len(words)] for i in range(300))
    chunks = chunk_document(text, tokenizer, chunk_tokens=40, overlap=12, min_chunk_tokens=5)
    assert len(chunks) > 5
    for prev, nxt in itertools.pairwise(chunks):
        shared = prev.end - nxt.first
        assert 12 <= shared <= 12 + 3  # at least the overlap; a word's pieces never split
        assert nxt.start_char < prev.end_char
        assert text[nxt.start_char : prev.end_char].split()[0] in words  # starts on a whole word
        assert prev.n_tokens <= 40
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    assert chunk_document("too short", tokenizer, chunk_tokens=40, overlap=12, min_chunk_tokens=5) == []


# -- documents: the stage ----------------------------------------------------------------------


def _documents(root: Path) -> Path:
    (root / "unit1").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.md").write_text("ref: refs/heads/main " * 20)
    (root / "unit1" / "cells.md").write_text(MARKDOWN + "\n" + " ".join(
        f"Cells divide by mitosis in stage {i} and the nucleus splits." for i in range(30)))
    (root / "genes.html").write_text("<html><body><p>" + " ".join(
        f"Genes carry heredity through DNA sequence number {i}." for i in range(25)) + "</p></body></html>")
    (root / "notes.txt").write_text("Plain notes about enzymes and catalysis in living cells. " * 6)
    (root / "tiny.txt").write_text("Too short.")
    (root / "blank.md").write_text("---\ntitle: x\n---\n<div></div>\n")
    (root / "figure.png").write_bytes(b"\x89PNG\r\n")
    (root / "LICENSE.txt").write_text("Creative Commons Attribution " * 20)
    return root


def test_document_folder_end_to_end(tmp_path, tiny_bert_dir):
    folder = _documents(tmp_path / "biology")
    sections = {"encoder": {"model": str(tiny_bert_dir), "batch_size": 4, "max_length": 64},
                    "ingest": {"chunk_tokens": 40, "chunk_overlap": 8, "min_chunk_tokens": 5, "exclude": ["LICENSE*"]},
                    "device": "cpu"}
    config = _config(tmp_path, {"biology": folder}, **sections)
    report = ingest(config, "biology")
    kb = _kb(config, "biology")

    assert report["kind"] == "documents" and report["dim"] == 32
    assert report["files_read"] == 3 and report["format"] == {"html": 1, "markdown": 1, "text": 1}
    assert report["skipped_files"] == {
        "LICENSE.txt": "excluded by ingest.exclude",
        "blank.md": "no text after cleaning",
        "figure.png": "not a document type (.htm, .html, .markdown, .md, .txt)",
        "tiny.txt": "shorter than ingest.min_chunk_tokens (5 tokens)",
    }
    assert report["files_skipped_by_reason"]["no text after cleaning"] == 1
    assert report["chunks"] == report["rows_kept"] == len(kb) > 6
    assert report["chunks_per_second"] > 0
    assert kb["id"].is_unique
    assert {i.split("#")[0] for i in kb["id"]} == {"unit1/cells.md", "genes.html", "notes.txt"}
    assert kb.loc[kb["id"] == "unit1/cells.md#0", "source"].item() == f"{folder.as_posix()}/unit1/cells.md#0"
    assert not kb["text"].str.contains("<|{:|!\\[|title:", regex=True).any()
    vectors = np.stack(kb["embedding"].to_numpy())
    assert vectors.shape == (len(kb), 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    assert report["embedding_cache"] == {"cached": 0, "computed": len(kb)}
    # a rerun gives the same ids, texts and embeddings (ids are the file and the chunk's place in it),
    # all from the embedding cache
    assert ingest(config, "biology")["embedding_cache"] == {"cached": len(kb), "computed": 0}
    again = _kb(config, "biology")
    assert again["id"].tolist() == kb["id"].tolist() and again["text"].tolist() == kb["text"].tolist()
    np.testing.assert_allclose(np.stack(again["embedding"].to_numpy()), vectors, atol=1e-6)


def test_embedding_order_survives_length_sorting(tmp_path, tiny_bert_dir):
    """Chunks are embedded longest first; each row must still get its own text's embedding."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, n in enumerate([3, 40, 12, 25]):
        (folder / f"d{i}.txt").write_text(" ".join(["word"] * n) + f" ending {i}.")
    config = _config(tmp_path, {"docs": folder}, device="cpu",
                     encoder={"model": str(tiny_bert_dir), "batch_size": 2, "max_length": 64},
                     ingest={"chunk_tokens": 60, "chunk_overlap": 0, "min_chunk_tokens": 1})
    ingest(config, "docs")
    kb = _kb(config, "docs")
    direct = embed(kb["text"].tolist(), str(tiny_bert_dir), batch_size=1, max_length=64, device_setting="cpu")
    np.testing.assert_allclose(np.stack(kb["embedding"].to_numpy()), direct, atol=1e-5)


def test_embedding_cache_resumes_and_follows_the_encoder(tmp_path, tiny_bert_dir):
    encoder = {"model": str(tiny_bert_dir), "batch_size": 2, "max_length": 32}
    texts = [f"sentence {i} about {'cells' if i % 2 else 'stars'}" for i in range(7)] + ["sentence 0 about stars"]
    cache = tmp_path / "cache"
    # a job that died after embedding three texts left them in the cache (flushed every 2)
    first, counts = embed_cached(texts[:3], encoder, "cpu", cache, desc="x", flush_every=2)
    assert counts == {"cached": 0, "computed": 3} and len(list(cache.glob("*.npz"))) == 2
    full, counts = embed_cached(texts, encoder, "cpu", cache, desc="x")
    assert counts == {"cached": 3, "computed": 4}  # 8 texts, 7 distinct
    np.testing.assert_array_equal(full[:3], first)
    np.testing.assert_array_equal(full[7], full[0])
    direct = embed(texts, str(tiny_bert_dir), batch_size=8, max_length=32, device_setting="cpu")
    np.testing.assert_allclose(full, direct, atol=1e-5)
    # another max_length is another encoding: nothing is reused
    _, counts = embed_cached(texts, dict(encoder, max_length=16), "cpu", cache, desc="x")
    assert counts == {"cached": 0, "computed": 7}
    (cache / "broken.npz").write_bytes(b"not a zip")  # an unreadable shard is ignored, not fatal
    assert embed_cached(texts, encoder, "cpu", cache, desc="x")[1] == {"cached": 7, "computed": 0}


def test_documents_with_the_real_minilm_encoder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# Supply and demand\n\n" + "Prices rise when demand exceeds supply. " * 40)
    (folder / "b.md").write_text("# Mitosis\n\n" + "A cell divides its nucleus during mitosis. " * 40)
    config = _config(tmp_path, {"docs": folder}, device="cpu")  # default encoder: all-MiniLM-L6-v2
    report = ingest(config, "docs")
    kb = _kb(config, "docs")
    assert report["dim"] == 384 and report["encoder"]["model"] == "all-MiniLM-L6-v2"
    vectors = np.stack(kb["embedding"].to_numpy())
    first = {d: vectors[kb["id"].str.startswith(d).to_numpy()] for d in ("a.md", "b.md")}
    # chunks of one document are closer to each other than to the other document's
    within = float(first["a.md"][0] @ first["a.md"][-1])
    across = float(first["a.md"][0] @ first["b.md"][0])
    assert within > across + 0.2


def test_empty_document_folder_is_an_error(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "image.png").write_bytes(b"x")
    (folder / "tiny.md").write_text("Hi.")
    with pytest.raises(IngestError, match=r"'docs': no usable documents in .*docs \(1 document file\(s\) found; 2 "
                                          r"skipped"):
        ingest(_config(tmp_path, {"docs": folder}, device="cpu"), "docs")


def test_non_utf8_document_names_the_file(tmp_path, tiny_bert_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ok.txt").write_text("Readable text about enzymes. " * 10)
    (folder / "bad.md").write_bytes(b"Caf\xe9 au lait " * 10)
    config = _config(tmp_path, {"docs": folder}, device="cpu", encoder={"model": str(tiny_bert_dir), "max_length": 64})
    with pytest.raises(IngestError, match=r"bad.md: not UTF-8 text \(bad byte at offset 3\)"):
        ingest(config, "docs")


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_ingest_and_cluster_on_the_demo(tmp_path, config_path):
    runner = CliRunner()
    for expert, rows in (("dsci_vis_510", 60), ("dsci_101", 114)):
        result = runner.invoke(app, ["ingest", "--config", str(config_path), "--expert", expert])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["cluster", "--config", str(config_path), "--expert", expert])
        assert result.exit_code == 0, result.output
        layout = Layout(tmp_path / "results")
        assert json.loads(layout.kb_report(expert).read_text())["rows_kept"] == rows
        assert len(pd.read_parquet(layout.clusters(expert))) == rows  # default noise policy: attach
        summary = json.loads(layout.cluster_summary(expert).read_text())
        assert summary["n_clusters"] >= 3 and summary["noise"]["policy"] == "attach"
        assert layout.cluster_plot(expert).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["ingest", "--config", str(config_path), "--expert", "nobody"])
    assert result.exit_code == 2  # a clear message on stderr, no traceback
    assert "error: --expert 'nobody' is not in config.experts" in result.stderr
    assert "Traceback" not in result.output
