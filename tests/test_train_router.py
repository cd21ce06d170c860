"""train_router: real DACT training from the fine-tuned backbone, the router directory, the Router round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moegate import Router
from moegate.io import write_json
from moegate.layout import Layout
from moegate.train_backbone import train_backbone
from moegate.train_router import fit, train_router
from moegate.training import load_tokens


@pytest.fixture
def backbone_run(tiny_run) -> dict:
    train_backbone(tiny_run)
    return tiny_run


def test_train_router_round_trip(backbone_run):
    layout = Layout.from_config(backbone_run)
    summary = train_router(backbone_run)
    out = layout.router
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "training.json"):
        assert (out / name).is_file(), name
    assert not (out / "metrics.json").exists()  # evaluate adds it
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == list(backbone_run["experts"]) and config["num_layers"] == 3
    assert config["lambda_"] == backbone_run["router"]["lambda_"] and config["max_length"] == 24
    meta = config["metadata"]
    assert meta["training"]["learning_rate"] == backbone_run["router"]["learning_rate"]
    assert meta["dataset"]["train"] == len(load_tokens(layout.tokens("train"))) and meta["wall_seconds"] > 0
    training = json.loads((out / "training.json").read_text())
    row = training["curves"][0]
    assert {"train_loss", "val_loss", "val_nll", "val_accuracy", "val_accuracy_full_depth",
            "val_mean_layers"} <= set(row)
    assert 1.0 <= row["val_mean_layers"] <= 3.0 and row["val_agreement"] == 1.0
    assert summary["epochs"] == 2 and not (layout.checkpoints / "router").exists()

    router = Router.from_pretrained(out, device="cpu")
    assert router.labels == list(backbone_run["experts"]) and router.num_layers == 3
    val = load_tokens(layout.tokens("val"))
    probs, exits = router.predict_tokens(val.input_ids, val.attention_mask, early_exit=True)
    accuracy = float((probs.argmax(1) == val.labels.numpy()).mean())
    assert accuracy == pytest.approx(summary["val_accuracy"])
    assert exits.mean() == pytest.approx(summary["val_mean_layers"])
    results = router.route(["how does the gradient relate to the layer?", ""])
    assert all(r.expert in router.labels and 1 <= r.exit_layer <= 3 for r in results)
    assert np.isclose(sum(results[0].distribution.values()), 1.0, atol=1e-5)


def test_tuned_values_and_study_names_reach_the_router(backbone_run):
    layout = Layout.from_config(backbone_run)
    write_json(layout.tuned("submodels"), {"study": "moegate-submodels", "params": {"router.head.width": 8}})
    write_json(layout.tuned("lambda"), {"study": "moegate-lambda", "params": {"router.lambda_": 0.2}})
    write_json(layout.tuned("training"), {"study": "moegate-training", "params": {"router.epochs": 1}})
    train_router(backbone_run)
    config = json.loads((layout.router / "config.json").read_text())
    assert config["lambda_"] == 0.2 and config["head"]["width"] == 8
    assert config["metadata"]["studies"] == {"submodels": "moegate-submodels", "training": "moegate-training",
                                             "lambda": "moegate-lambda"}
    assert config["metadata"]["tuned"]["lambda"] == {"router.lambda_": 0.2}
    assert config["metadata"]["epochs_run"] == 1


def test_fit_for_tuning_writes_nothing(backbone_run):
    layout = Layout.from_config(backbone_run)
    result = fit(backbone_run)
    assert set(result) >= {"val_accuracy", "val_accuracy_full_depth", "val_mean_layers", "val_nll", "curves"}
    assert 0.0 <= result["val_accuracy"] <= 1.0 and 1.0 <= result["val_mean_layers"] <= 3.0
    assert not layout.router.exists() and not (layout.checkpoints / "router").exists()


def test_multi_objective_trial_is_not_reported(backbone_run):
    import optuna

    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    result = fit(backbone_run, trial=trial)  # report() is single-objective only: the hook must skip it
    assert result["epochs"] == 2 and study.trials[0].intermediate_values == {}


def test_backbone_trained_on_other_labels_is_a_clear_error(backbone_run):
    layout = Layout.from_config(backbone_run)
    write_json(layout.backbone / "labels.json", {"labels": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"backbone/labels\.json: labels \['a', 'b', 'c'\] differ"):
        fit(backbone_run)
