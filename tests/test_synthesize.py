"""The synthesize stage: contexts from clusters, the offline writer, outputs, the openai path end to end."""

from __future__ import annotations

import json
import logging
import re

import pandas as pd
import pytest
from conftest import DEMO, write_config
from llm_stub import Reply, StubLLM
from typer.testing import CliRunner

from moegate.config import load
from moegate.layout import Layout
from moegate.questions import STOP_WORDS, OfflineQuestionWriter, clauses, key_terms
from moegate.stages.synthesize import QUERY_COLUMNS, SynthesizeError, build_contexts, synthesize

KEY_ENV = "MOEGATE_TEST_KEY"
SECRET = "sk-test-SECRET-7f3a9b2c4d5e6f708192"
EXPERT = "dsci_101"
CONTEXT = (
    "Photosynthesis is the process by which plants convert light energy into chemical energy. "
    "The light-dependent reactions take place in the thylakoid membranes of the chloroplast. "
    "Chlorophyll absorbs red and blue light and reflects green light. "
    "The Calvin cycle fixes carbon dioxide into glucose in the stroma of the chloroplast. "
    "Cellular respiration releases the chemical energy stored in glucose as ATP. "
    "Mitochondria are the organelles where cellular respiration produces most of the ATP."
)
# Words the templates add around the context's own words.
TEMPLATE_WORDS = set("""
what is are does do mean meant by can you explain in simple terms why important an example of which the
following best describes statements about correct how would define i don't understand help main features
with purpose role play matter when studying affect relationship between and difference related used compare
for understanding explains relates to happens changes it that true definition explained vs a
""".split())


def demo_texts(expert: str, rows: int) -> list[str]:
    lines = (DEMO / f"{expert}_data.jsonl").read_text().splitlines()[:rows]
    return [json.loads(line)["text"] for line in lines]


def write_inputs(config: dict, expert: str, texts: list[str], clusters: list[int]) -> None:
    """kb/{expert}.parquet and clusters/{expert}.parquet following docs/architecture.md."""
    layout = Layout.from_config(config)
    ids = [f"{expert}-{i}" for i in range(len(texts))]
    kb = pd.DataFrame({"id": ids, "text": texts, "embedding": [[0.1, 0.2, 0.3]] * len(texts),
                       "source": ["test.jsonl"] * len(texts)})
    cl = pd.DataFrame({"id": ids, "cluster": clusters, "probability": [1.0] * len(texts)})
    layout.kb(expert).parent.mkdir(parents=True, exist_ok=True)
    layout.clusters(expert).parent.mkdir(parents=True, exist_ok=True)
    kb.to_parquet(layout.kb(expert), index=False)
    cl.to_parquet(layout.clusters(expert), index=False)


@pytest.fixture
def demo_run(tmp_path):
    """A config with 12 real demo chunks of one expert in 3 clusters (and noise kept as -1)."""
    path = write_config(tmp_path, synthesize={"questions_per_context": 5, "context_tokens": 200})
    config = load(path)
    write_inputs(config, EXPERT, demo_texts(EXPERT, 12), [0, 0, 1, 1, 2, 2, 0, 1, 2, -1, 0, 1])
    return path, config


# -- contexts ---------------------------------------------------------------------------------------

def test_contexts_pack_each_cluster_under_the_budget_in_kb_order():
    texts = ["w " * 30, "x " * 30, "y " * 50, "z " * 10, "v " * 90, " "]
    kb = pd.DataFrame({"id": list("abcdef"), "text": texts})
    clusters = pd.DataFrame({"id": list("fedcba"), "cluster": [1, 1, 0, 0, 0, 0]})
    contexts = build_contexts(kb, clusters, "e", context_tokens=64)
    assert [c.context_id for c in contexts] == ["e/0/0", "e/0/1", "e/1/0"]
    assert [c.chunk_ids for c in contexts] == [("a", "b"), ("c", "d"), ("e",)]
    assert [c.tokens for c in contexts] == [60, 60, 64]  # the 90-token chunk is cut to the budget
    assert all(c.tokens <= 64 for c in contexts) and contexts[2].text == " ".join(["v"] * 64)


def test_contexts_reject_ids_missing_from_the_kb():
    kb = pd.DataFrame({"id": ["a"], "text": ["some text"]})
    with pytest.raises(ValueError, match=r"clusters/e\.parquet: 1 id\(s\) not in kb/e\.parquet, e\.g\. 'zz'"):
        build_contexts(kb, pd.DataFrame({"id": ["a", "zz"], "cluster": [0, 0]}), "e", 64,
                       "kb/e.parquet", "clusters/e.parquet")


def test_missing_inputs_and_columns_are_named(tmp_path):
    config = load(write_config(tmp_path))
    with pytest.raises(SynthesizeError, match=r"kb/dsci_101\.parquet: missing \(run the ingest stage"):
        synthesize(config, EXPERT)
    write_inputs(config, EXPERT, ["a b c"], [0])
    pd.DataFrame({"id": ["dsci_101-0"]}).to_parquet(Layout.from_config(config).clusters(EXPERT))
    with pytest.raises(ValueError, match=r"clusters/dsci_101\.parquet: missing column\(s\) \['cluster'\]"):
        synthesize(config, EXPERT)
    with pytest.raises(KeyError, match="not in config.experts"):
        synthesize(config, "physics")


# -- the offline writer -----------------------------------------------------------------------------

def test_offline_questions_are_deterministic_varied_and_distinct():
    writer = OfflineQuestionWriter(seed=0)
    qs = writer.questions("bio/0/0", CONTEXT, 10)
    assert qs == OfflineQuestionWriter(seed=0).questions("bio/0/0", CONTEXT, 10)
    assert qs != OfflineQuestionWriter(seed=1).questions("bio/0/0", CONTEXT, 10)
    assert len(qs) == 10 and len({q.lower() for q in qs}) == 10
    assert all(q.strip() and len(q.split()) >= 2 for q in qs)
    openers = {" ".join(q.lower().split()[:2]) for q in qs}
    assert len(openers) >= 5, f"templates not varied: {qs}"


def test_offline_questions_carry_the_contexts_words_and_no_template_junk():
    context_words = {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z-]*", CONTEXT)}
    for seed in range(5):
        for q in OfflineQuestionWriter(seed).questions(f"bio/0/{seed}", CONTEXT, 8):
            words = {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]*", q)}
            foreign = words - context_words - TEMPLATE_WORDS
            assert not foreign, f"{q!r} has words from neither the context nor a template: {foreign}"
            assert words & (context_words - STOP_WORDS - TEMPLATE_WORDS), f"{q!r} carries no context term"
            assert not re.search(r"\b(the|a|an|of|and|to)\W*$", q.rstrip("?. "), re.IGNORECASE), q


def test_key_terms_and_clauses_pick_content():
    terms = [t.text for t in key_terms(CONTEXT)]
    assert {"chloroplast", "glucose", "cellular respiration"} <= set(terms)
    assert not {"the", "is", "which", "by"} & set(terms)
    found = clauses(CONTEXT)
    assert any(c.aux == "are" and c.subject == "mitochondria" for c in found)
    assert all(not c.text.endswith(".") for c in found)


def test_offline_writer_handles_empty_and_tiny_contexts():
    writer = OfflineQuestionWriter(0)
    assert writer.questions("e/0/0", "", 5) == []
    assert writer.questions("e/0/0", "the of and", 5) == []
    few = writer.questions("e/0/0", "Entropy.", 5)
    assert len(few) == len(set(few)) and all("ntropy" in q for q in few)


# -- the stage, offline -----------------------------------------------------------------------------

def test_synthesize_offline_writes_queries_and_report(demo_run):
    _, config = demo_run
    report = synthesize(config, EXPERT)
    layout = Layout.from_config(config)
    frame = pd.read_parquet(layout.queries(EXPERT))
    assert list(frame.columns) == QUERY_COLUMNS
    assert frame["cluster"].dtype == "int64" and set(frame["cluster"]) <= {-1, 0, 1, 2}
    assert (frame["expert"] == EXPERT).all() and (frame["backend"] == "offline").all()
    assert frame["context_id"].str.fullmatch(rf"{EXPERT}/-?\d+/\d+").all()
    assert frame["query"].str.lower().is_unique and (frame["query"].str.len() > 0).all()
    on_disk = json.loads(layout.queries_report(EXPERT).read_text())
    assert on_disk == report
    assert report["written"] == len(frame) > 0
    assert report["requested"] == 5 * report["contexts"]
    lost = sum(report["skipped"]["questions"].values())
    assert report["written"] + lost == report["requested"]
    assert report["skipped"]["contexts"] == {} and report["requests"] == 0
    assert report["context_tokens"]["max"] <= 200


def test_synthesize_offline_is_deterministic_and_follows_the_seed(demo_run, tmp_path):
    _, config = demo_run
    layout = Layout.from_config(config)
    synthesize(config, EXPERT)
    first = pd.read_parquet(layout.queries(EXPERT))
    synthesize(config, EXPERT)
    pd.testing.assert_frame_equal(first, pd.read_parquet(layout.queries(EXPERT)))
    synthesize({**config, "seed": 7}, EXPERT)
    assert not first["query"].equals(pd.read_parquet(layout.queries(EXPERT))["query"])


def test_cli_runs_the_stage(demo_run):
    from moegate.cli import app

    path, config = demo_run
    result = CliRunner().invoke(app, ["synthesize", "--config", str(path), "--expert", EXPERT])
    assert result.exit_code == 0, result.output
    assert Layout.from_config(config).queries(EXPERT).is_file()


# -- the stage, openai through the stub -------------------------------------------------------------

def openai_config(tmp_path, url: str, **openai) -> dict:
    section = {"model": "stub-model", "base_url": url, "api_key_env": KEY_ENV, "concurrency": 2,
               "max_retries": 1, "max_wait_s": 0.5, "timeout_s": 5, **openai}
    path = write_config(tmp_path, synthesize={"backend": "openai", "questions_per_context": 3,
                                              "context_tokens": 200, "openai": section})
    config = load(path)
    write_inputs(config, EXPERT, demo_texts(EXPERT, 8), [0, 0, 0, 1, 1, 1, 2, 2])
    return config


def test_openai_backend_end_to_end_then_a_rerun_hits_the_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    with StubLLM() as stub:
        config = openai_config(tmp_path, stub.url)
        first = synthesize(config, EXPERT)
        calls = stub.count
        assert calls == first["contexts"] == first["cache"]["misses"] and first["cache"]["hits"] == 0
        assert first["tokens"]["prompt"] == 50 * calls and first["tokens"]["completion"] == 20 * calls
        layout = Layout.from_config(config)
        frame = pd.read_parquet(layout.queries(EXPERT))
        again = synthesize(config, EXPERT)
        assert stub.count == calls, "a rerun sent requests again"
    assert again["cache"] == {"hits": calls, "misses": 0} and again["tokens"]["prompt"] == 0
    assert again["tokens"]["cached_prompt"] == 50 * calls
    pd.testing.assert_frame_equal(frame, pd.read_parquet(layout.queries(EXPERT)))
    assert (frame["backend"] == "openai").all() and (frame["model"] == "stub-model").all()
    assert len(frame) == first["written"] == 3 * first["contexts"]
    # the key: sent to the server, never written or logged
    assert stub.auth_headers[0] == f"Bearer {SECRET}"
    assert SECRET not in caplog.text
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_openai_failures_are_counted_and_too_many_fail_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    bad = [Reply.content("not a question list")] * 3  # one context: a reply and two re-asks, all bad
    with StubLLM(bad) as stub:
        config = openai_config(tmp_path, stub.url, concurrency=1)
        report = synthesize(config, EXPERT)
    assert report["skipped"]["contexts"] == {"bad_reply": 1} and report["bad_replies"] == 3
    assert report["written"] == 3 * (report["contexts"] - 1)
    assert report["failures"][0]["reason"] == "bad_reply"

    with StubLLM(default=lambda r: Reply.error(503, retry_after="60")) as stub:
        (tmp_path / "down").mkdir()
        config = openai_config(tmp_path / "down", stub.url)
        with pytest.raises(RuntimeError, match=r"contexts got no reply .*server_error.* rerun"):
            synthesize(config, EXPERT)
        assert not Layout.from_config(config).queries(EXPERT).exists()


def test_cli_names_the_missing_key_variable(tmp_path, monkeypatch):
    from moegate.cli import app

    monkeypatch.delenv(KEY_ENV, raising=False)
    path = write_config(tmp_path, synthesize={"backend": "openai", "openai": {"api_key_env": KEY_ENV}})
    write_inputs(load(path), EXPERT, demo_texts(EXPERT, 2), [0, 0])
    result = CliRunner().invoke(app, ["synthesize", "--config", str(path), "--expert", EXPERT])
    assert result.exit_code == 2
    assert f"environment variable {KEY_ENV} is not set" in result.stderr
