"""evaluate: every test row counted, early exit agrees with full depth, backbone scored, plots written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_questions

from moegate.layout import Layout
from moegate.stages.evaluate import (
    ExitMismatchError,
    check_exit_exact,
    classification_metrics,
    evaluate,
    exit_statistics,
    mcnemar_exact,
    read_real_questions,
)
from moegate.stages.train_backbone import train_backbone
from moegate.stages.train_router import train_router


def _train(config: dict) -> None:
    """backbone/ and router/ for ``config``, as the workflow builds them before evaluate."""
    from moegate.stages.states import states

    train_backbone(config)
    states(config)  # the router's frozen encoder trains its DACT units on this cache
    train_router(config)


def test_classification_metrics_by_hand():
    labels = ["a", "b", "c"]
    truth = np.array([0, 0, 1, 1, 1])
    predicted = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(labels, truth, predicted)
    assert m["accuracy"] == pytest.approx(0.6) and m["rows"] == 5
    assert m["confusion"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert m["per_expert_recall"] == {"a": 0.5, "b": pytest.approx(2 / 3), "c": None}
    # F1: a = 0.5, b = 2/3, c = 0 (no rows, never predicted) -> macro over all three experts
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)


def test_exit_statistics_histogram_and_means():
    stats = exit_statistics(["a", "b"], np.array([0, 0, 1, 1]), np.array([1, 1, 3, 2]), num_layers=3)
    assert stats["histogram"] == {"1": 2, "2": 1, "3": 1}
    assert stats["mean_layers"] == pytest.approx(1.75) and stats["layer_fraction"] == pytest.approx(1.75 / 3)
    assert stats["mean_layers_per_expert"] == {"a": 1.0, "b": 2.5}


def test_evaluate_counts_every_test_row_and_agrees_with_full_depth(tiny_run):
    layout = Layout.from_config(tiny_run)
    _train(tiny_run)
    metrics = evaluate(tiny_run)

    rows = len(pd.read_parquet(layout.split("test")))
    assert rows % 64 != 0  # a partial last batch exists and must be counted
    written = json.loads((layout.router / "metrics.json").read_text())
    assert written["test_rows"] == rows == metrics["test_rows"]
    for system in ("router_early_exit", "router_full_depth", "backbone"):
        m = written[system]
        assert m["rows"] == rows and np.asarray(m["confusion"]).sum() == rows
        assert set(m["per_expert_recall"]) == set(tiny_run["experts"]) and 0.0 <= m["macro_f1"] <= 1.0
    early = written["router_early_exit"]
    assert sum(early["histogram"].values()) == rows and list(early["histogram"]) == ["1", "2", "3"]
    assert 1.0 <= early["mean_layers"] <= 3.0
    assert written["agreement_early_exit_vs_full_depth"] == 1.0 and written["disagreements"] == 0
    assert written["disagreements_at_float_ties"] == 0
    assert early["accuracy"] == written["router_full_depth"]["accuracy"]
    # each layer's own classifier, counted over every row (one big batch here vs 64-row batches there)
    from moegate.router import Router
    from moegate.training import load_tokens

    test = load_tokens(layout.tokens("test"))
    model = Router.from_pretrained(layout.router, device="cpu").model
    with torch.no_grad():
        y = model(test.input_ids, test.attention_mask).y
    expected = (y.argmax(-1) == test.labels).float().mean(1).tolist()
    assert early["layer_classifier_accuracy"] == pytest.approx(expected, abs=1e-6)
    for plot in ("exit_layers.png", "confusion.png"):
        assert (layout.evaluation / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_rejects_test_files_that_disagree(tiny_run):
    layout = Layout.from_config(tiny_run)
    _train(tiny_run)
    frame = pd.read_parquet(layout.split("test"))
    frame.iloc[:-1].to_parquet(layout.split("test"), index=False)
    with pytest.raises(ValueError, match=r"test\.parquet \(\d+ rows\) and .*test\.safetensors"):
        evaluate(tiny_run)


def test_check_exit_exact_counts_float_ties_apart():
    full = np.array([[0.6, 0.3, 0.1], [0.5, 0.5 - 1e-7, 0.0], [0.2, 0.7, 0.1]])
    same = full.copy()
    assert check_exit_exact(same, full, "rows") == {"disagreements": 0, "disagreements_at_float_ties": 0}
    tie_flipped = full.copy()
    tie_flipped[1] = [0.4, 0.6, 0.0]  # row 1 is a float tie at full depth: either expert is its answer
    assert check_exit_exact(tie_flipped, full, "rows") == {"disagreements": 1, "disagreements_at_float_ties": 1}
    with pytest.raises(ExitMismatchError, match=r"different experts on 2 of 3 test rows \(rows 0, 2\)"):
        check_exit_exact(full[:, [1, 0, 2]], full, "test rows")


def test_evaluate_fails_when_early_exit_and_full_depth_disagree(tiny_run, monkeypatch):
    from moegate.models.dact import DactRouterModel

    layout = Layout.from_config(tiny_run)
    _train(tiny_run)
    full_depth = DactRouterModel.full_depth

    def wrong_exit(self, input_ids, attention_mask):  # an exit rule that returns another expert for every row
        probs, layers = full_depth(self, input_ids, attention_mask)
        return probs.roll(1, dims=1), layers

    monkeypatch.setattr(DactRouterModel, "early_exit", wrong_exit)
    rows = len(pd.read_parquet(layout.split("test")))
    with pytest.raises(ExitMismatchError, match=rf"different experts on {rows} of {rows} test rows"):
        evaluate(tiny_run)
    assert not (layout.router / "metrics.json").exists()


def test_mcnemar_exact_by_hand():
    # 0 vs 5 discordant rows: 2 * P(X <= 0), X ~ Binomial(5, 1/2) = 2 / 32
    only_b = mcnemar_exact([False] * 5 + [True] * 3, [True] * 5 + [True] * 3)
    assert only_b == {"p_value": pytest.approx(0.0625), "a_only": 0, "b_only": 5}
    # 1 vs 4: 2 * (1 + 5) / 32
    assert mcnemar_exact([True, False, False, False, False], [False, True, True, True, True])["p_value"] == \
        pytest.approx(12 / 32)
    assert mcnemar_exact([True, False, True], [False, True, True])["p_value"] == 1.0  # b == c
    assert mcnemar_exact([True, False], [True, False]) == {"p_value": 1.0, "a_only": 0, "b_only": 0}
    with pytest.raises(ValueError, match="one length"):
        mcnemar_exact([True], [True, False])


def _write_csv(path, rows, header=("question", "expert")):
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


def test_read_real_questions_names_file_rows_and_unknown_experts(tmp_path):
    labels = ["a", "b"]
    path = _write_csv(tmp_path / "real.csv", [("q1", "a"), ("q2", "zz"), ("q3", "b"), ("q4", "zz"), ("q5", "yy")])
    with pytest.raises(ValueError, match=r"real\.csv: 3 row\(s\) \(2, 4, 5\) .*'zz': 2, 'yy': 1"):
        read_real_questions(path, labels)
    blank = _write_csv(tmp_path / "blank.csv", [("q1", "a"), ("  ", "b")])
    with pytest.raises(ValueError, match=r"blank\.csv: 1 empty question\(s\) in row\(s\) 2"):
        read_real_questions(blank, labels)
    no_expert = _write_csv(tmp_path / "cols.csv", [("q1", "a")], header=("question", "course"))
    with pytest.raises(ValueError, match=r"cols\.csv: missing column\(s\) \['expert'\]"):
        read_real_questions(no_expert, labels)
    with pytest.raises(ValueError, match=r"nowhere\.csv: real questions CSV not found"):
        read_real_questions(tmp_path / "nowhere.csv", labels)
    # other columns are ignored, whitespace around the expert is not an error
    extra = _write_csv(tmp_path / "extra.csv", [("q1", " b ", "x"), ("q2", "a", "y")],
                       header=("question", "expert", "source"))
    texts, truth = read_real_questions(extra, labels)
    assert texts == ["q1", "q2"] and truth.tolist() == [1, 0]


def test_evaluate_scores_real_questions(tiny_run, tmp_path):
    layout = Layout.from_config(tiny_run)
    real = _write_csv(tmp_path / "real.csv", tiny_questions(per_expert=3, seed=1))
    tiny_run["evaluate"]["real_questions"] = str(real)
    _train(tiny_run)
    evaluate(tiny_run)

    real_metrics = json.loads((layout.router / "metrics.json").read_text())["real_questions"]
    assert real_metrics["path"] == str(real) and real_metrics["rows"] == 9
    for system in ("router_early_exit", "router_full_depth", "backbone", "tfidf_logreg"):
        m = real_metrics[system]
        assert m["rows"] == 9 and np.asarray(m["confusion"]).sum() == 9 and 0.0 <= m["accuracy"] <= 1.0
        assert m["support"] == {expert: 3 for expert in tiny_run["experts"]}
    assert sum(real_metrics["router_early_exit"]["histogram"].values()) == 9
    assert real_metrics["agreement_early_exit_vs_full_depth"] == 1.0
    # a labelled-CSV dataset has no KB index: no retrieval routing, nothing to pair it with
    assert not layout.kb_index.exists()
    assert real_metrics["retrieval_routing"] is None and real_metrics["mcnemar_vs_retrieval"] is None

    # with a KB index (here: other tiny questions as its chunks), retrieval routing is scored and paired
    from moegate.retrieval import KBIndex, embed_queries

    chunks = tiny_questions(per_expert=4, seed=2)
    labels = json.loads(layout.labels.read_text())["labels"]
    index = KBIndex(embed_queries([q for q, _ in chunks], tiny_run), torch.tensor([labels.index(e) for _, e in chunks]),
                    [str(i) for i in range(len(chunks))], labels, tiny_run["encoder"]["model"])
    index.save(layout.kb_index)
    tiny_run["evaluate"]["retrieval_top_k"] = 2
    real_metrics = evaluate(tiny_run)["real_questions"]
    assert real_metrics["retrieval_routing"]["rows"] == 9 and 0.0 <= real_metrics["retrieval_routing"]["accuracy"] <= 1
    pairs = real_metrics["mcnemar_vs_retrieval"]
    assert set(pairs) == {"router_early_exit", "backbone", "tfidf_logreg"}
    for name, test in pairs.items():
        right = round(real_metrics[name]["accuracy"] * 9) - round(real_metrics["retrieval_routing"]["accuracy"] * 9)
        assert test["b"] - test["c"] == right and 0.0 < test["p_value"] <= 1.0
    KBIndex(index.vectors, index.expert, index.chunk_ids, labels[::-1], index.encoder).save(layout.kb_index)
    with pytest.raises(ValueError, match=r"kb_index\.safetensors: labels .* differ"):
        evaluate(tiny_run)


def test_evaluate_reports_abstention_at_the_saved_threshold(tiny_run, tmp_path):
    from moegate.router import Router

    layout = Layout.from_config(tiny_run)
    real = _write_csv(tmp_path / "real.csv", tiny_questions(per_expert=3, seed=1))
    off_topic = ["how long should I boil an egg", "who won the world cup in 2014", "tell me a joke"]
    off = tmp_path / "off.csv"
    pd.DataFrame({"question": off_topic, "kind": "chitchat"}).to_csv(off, index=False)
    tiny_run["evaluate"].update(real_questions=str(real), off_topic_questions=[str(off)])
    _train(tiny_run)
    abstain = evaluate(tiny_run)["abstain"]

    assert abstain == json.loads((layout.router / "metrics.json").read_text())["abstain"]
    router = Router.from_pretrained(layout.router, device="cpu")
    assert abstain["score"] == "kb_similarity" and abstain["threshold"] == router.abstain_below
    assert abstain["calibration"] == router.abstain["calibration"] and abstain["auroc_in_domain"] == "real_questions"
    test_questions = pd.read_parquet(layout.split("test"))["query"].tolist()
    real_questions = pd.read_csv(real)["question"].tolist()
    for name, texts in (("test", test_questions), ("real_questions", real_questions)):
        share = np.mean([r.expert is None for r in router.route(texts)])
        assert abstain["in_domain"][name] == {"rows": len(texts), "abstain_rate": pytest.approx(share)}
    entry = abstain["off_topic"][str(off)]
    assert entry["rows"] == 3 and entry["abstain_rate"] == pytest.approx(
        np.mean([r.expert is None for r in router.route(off_topic)]))
    assert set(entry["auroc"]) == {"kb_similarity", "probability"}
    assert all(0.0 <= v <= 1.0 for v in entry["auroc"].values())
    assert abstain["off_topic_all"]["rows"] == 3

    pd.DataFrame({"text": off_topic}).to_csv(off, index=False)
    with pytest.raises(ValueError, match=r"off\.csv: missing column\(s\) \['question'\]"):
        evaluate(tiny_run)
