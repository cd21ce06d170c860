"""train_router: real DACT training from the fine-tuned backbone, the router directory, the Router round trip."""

from __future__ import annotations

import json
from pathlib import Path

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


# -- the frozen encoder: cached states, prototype units, LP-FT, the λ sweep ------------------------------
def _frozen(config: dict, **router) -> dict:
    import copy

    from moegate.states import states

    config = copy.deepcopy(config)
    config["router"].update({"encoder_mode": "frozen", **router})
    config["router"]["head"].update({"classifier": "prototypes", "prototypes": 4, "prototype_top_k": 2})
    states(config)
    return config


def test_frozen_router_trains_on_cached_states_and_keeps_the_pretrained_encoder(tiny_run):
    import torch
    from safetensors.torch import load_file

    from moegate.encoder import resolve_model
    from moegate.states import load_states

    config = _frozen(tiny_run)
    layout = Layout.from_config(config)
    train = load_states(config, "train")
    assert train.states.shape[:2] == (3, len(load_tokens(layout.tokens("train"))))
    summary = train_router(config)
    assert summary["epochs"] >= 1 and 1.0 <= summary["val_mean_layers"] <= 3.0
    saved = load_file(str(layout.router / "model.safetensors"))
    pretrained = load_file(str(Path(resolve_model(config["backbone"]["model"])) / "model.safetensors"))
    key = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(saved[f"encoder.{key}"], pretrained[key])  # the encoder did not move
    meta = json.loads((layout.router / "config.json").read_text())["metadata"]
    assert meta["encoder_mode"] == "frozen" and meta["dataset"]["train"] == len(train)
    # the validation numbers read off cached states are what the saved router does on tokens
    router = Router.from_pretrained(layout.router, device="cpu")
    val = load_tokens(layout.tokens("val"))
    probs, exits = router.predict_tokens(val.input_ids, val.attention_mask)
    assert float((probs.argmax(1) == val.labels.numpy()).mean()) == pytest.approx(summary["val_accuracy"])
    assert exits.mean() == pytest.approx(summary["val_mean_layers"], abs=1e-6)


def test_stale_states_are_refused(tiny_run):
    config = _frozen(tiny_run)
    config["router"]["head"]["pooling"] = "mean" if config["router"]["head"]["pooling"] == "cls" else "cls"
    with pytest.raises(ValueError, match="cached states do not match this run"):
        fit(config)


def test_lambda_sweep_chooses_by_the_tolerance_rule_and_is_recorded(tiny_run):
    config = _frozen(tiny_run, lambda_grid=[0.0, 0.5, 2.0])
    layout = Layout.from_config(config)
    train_router(config)
    training = json.loads((layout.router / "training.json").read_text())
    sweep = training["lambda_sweep"]
    assert [r["lambda_"] for r in sweep["rows"]] == [0.0, 0.5, 2.0]
    best = max(r["val_accuracy"] for r in sweep["rows"])
    within = [r for r in sweep["rows"] if r["val_accuracy"] >= best - sweep["accuracy_tolerance"] - 1e-12]
    assert sweep["chosen"]["val_mean_layers"] == min(r["val_mean_layers"] for r in within)
    assert json.loads((layout.router / "config.json").read_text())["lambda_"] == sweep["chosen"]["lambda_"]


def test_lpft_probes_then_finetunes_the_encoder(tiny_run):
    import torch
    from safetensors.torch import load_file

    from moegate.encoder import resolve_model

    config = _frozen(tiny_run, encoder_mode="lpft", epochs=1)
    layout = Layout.from_config(config)
    summary = train_router(config)
    stages = [row["stage"] for row in summary["curves"]]
    assert "probe" in stages and stages[-1] == "finetune"
    saved = load_file(str(layout.router / "model.safetensors"))
    pretrained = load_file(str(Path(resolve_model(config["backbone"]["model"])) / "model.safetensors"))
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(saved[f"encoder.{key}"], pretrained[key])  # the second stage moved the encoder
