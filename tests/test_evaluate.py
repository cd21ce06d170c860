"""evaluate: every test row counted, early exit agrees with full depth, backbone scored, plots written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from moegate.evaluate import classification_metrics, evaluate, exit_statistics
from moegate.layout import Layout
from moegate.train_backbone import train_backbone
from moegate.train_router import train_router


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
    train_backbone(tiny_run)
    train_router(tiny_run)
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
    train_backbone(tiny_run)
    train_router(tiny_run)
    frame = pd.read_parquet(layout.split("test"))
    frame.iloc[:-1].to_parquet(layout.split("test"), index=False)
    with pytest.raises(ValueError, match=r"test\.parquet \(\d+ rows\) and .*test\.safetensors"):
        evaluate(tiny_run)
