"""train_router: real DACT training from the fine-tuned backbone, the router directory, the Router round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moegate import Router
from moegate.io import write_json
from moegate.layout import Layout
from moegate.stages.train_backbone import train_backbone
from moegate.stages.train_router import fit, train_router
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
    assert config["ponder_cost"] == backbone_run["router"]["ponder_cost"] and config["max_length"] == 24
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
    results = router.route(["how does the gradient relate to the layer?", ""], abstain_below=-1.0)
    assert all(r.expert in router.labels and 1 <= r.exit_layer <= 3 for r in results)
    assert np.isclose(sum(results[0].distribution.values()), 1.0, atol=1e-5)

    # the abstain threshold, calibrated on the validation questions, is the router's default: none of them
    # abstains at max_in_domain_rate 0.02 with fewer than 50 of them
    abstain = config["abstain"]
    assert abstain["score"] == "kb_similarity" and abstain["max_in_domain_rate"] == 0.02
    assert (out / "kb_index.safetensors").is_file() and abstain["kb_rows"] == meta["dataset"]["train"]
    assert abstain["kb_reference"].startswith("train questions")  # a labelled-CSV dataset has no KB windows
    val_questions = pd.read_parquet(layout.split("val"))["query"].tolist()
    assert len(val_questions) < 50 and abstain["calibration"]["questions"] == len(val_questions)
    routed = router.route(val_questions)
    assert all(r.expert is not None and -1 <= r.kb_similarity <= 1 for r in routed)
    assert router.abstain_below == abstain["threshold"] < min(r.kb_similarity for r in routed)


def test_tuned_values_and_study_names_reach_the_router(backbone_run):
    layout = Layout.from_config(backbone_run)
    write_json(layout.tuned("submodels"), {"study": "moegate-submodels", "params": {"router.head.width": 8}})
    write_json(layout.tuned("lambda"), {"study": "moegate-lambda", "params": {"router.ponder_cost": 0.2}})
    write_json(layout.tuned("training"), {"study": "moegate-training", "params": {"router.epochs": 1}})
    train_router(backbone_run)
    config = json.loads((layout.router / "config.json").read_text())
    assert config["ponder_cost"] == 0.2 and config["head"]["width"] == 8
    assert config["metadata"]["studies"] == {"submodels": "moegate-submodels", "training": "moegate-training",
                                             "lambda": "moegate-lambda"}
    assert config["metadata"]["tuned"]["lambda"] == {"router.ponder_cost": 0.2}
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

    from moegate.stages.states import states

    config = copy.deepcopy(config)
    config["router"].update({"encoder_mode": "frozen", **router})
    config["router"]["head"].update({"classifier": "prototypes", "prototypes": 4, "prototype_top_k": 2})
    states(config)
    return config


def test_frozen_router_trains_on_cached_states_and_keeps_the_pretrained_encoder(tiny_run):
    import torch
    from safetensors.torch import load_file

    from moegate.encoder import resolve_model
    from moegate.stages.states import load_states

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
    config = _frozen(tiny_run, ponder_cost_grid=[0.0, 0.5, 2.0])
    layout = Layout.from_config(config)
    train_router(config)
    training = json.loads((layout.router / "training.json").read_text())
    sweep = training["lambda_sweep"]
    assert [r["ponder_cost"] for r in sweep["rows"]] == [0.0, 0.5, 2.0]
    best = max(r["val_accuracy"] for r in sweep["rows"])
    within = [r for r in sweep["rows"] if r["val_accuracy"] >= best - sweep["accuracy_tolerance"] - 1e-12]
    assert sweep["chosen"]["val_mean_layers"] == min(r["val_mean_layers"] for r in within)
    assert json.loads((layout.router / "config.json").read_text())["ponder_cost"] == sweep["chosen"]["ponder_cost"]


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


def test_a_failed_states_stage_leaves_the_previous_cache_whole(tiny_run, monkeypatch):
    import moegate.stages.states as stage

    config = _frozen(tiny_run)
    layout = Layout.from_config(config)
    before = {p.name: p.read_bytes() for p in layout.states.iterdir()}
    assert set(before) == {"train.safetensors", "val.safetensors", "test.safetensors", "report.json"}
    write_json_ = stage.write_json

    def fail_at_report(path, obj):
        if path.name == "report.json":
            raise KeyboardInterrupt("killed")
        write_json_(path, obj)

    config["router"]["head"]["pooling"] = "mean"  # other states
    monkeypatch.setattr(stage, "write_json", fail_at_report)
    with pytest.raises(KeyboardInterrupt):
        stage.states(config)
    assert {p.name: p.read_bytes() for p in layout.states.iterdir()} == before
    assert not [p.name for p in layout.results.iterdir() if p.name.startswith(".")]


# -- resume: a stale checkpoint is never resumed; real kills resume to the uninterrupted result -------------
@pytest.mark.parametrize("change", ["nothing", "ponder_cost in the config", "tuned ponder_cost", "tuned learning_rate"])
def test_a_checkpoint_is_resumed_only_by_the_run_it_belongs_to(backbone_run, change, caplog):
    import logging
    import shutil

    layout = Layout.from_config(backbone_run)
    checkpoints = layout.checkpoints / "router"
    fit(backbone_run, checkpoint_dir=checkpoints)  # no out_dir: the checkpoint (after epoch 2 of 2) stays
    assert (checkpoints / "checkpoint.pt").is_file()
    config = dict(backbone_run, router=dict(backbone_run["router"]))
    if change == "ponder_cost in the config":
        config["router"]["ponder_cost"] = 0.02
    elif change == "tuned ponder_cost":
        write_json(layout.tuned("lambda"), {"study": "moegate-lambda", "params": {"router.ponder_cost": 0.02}})
    elif change == "tuned learning_rate":
        write_json(layout.tuned("training"), {"study": "moegate-training", "params": {"router.learning_rate": 1e-3}})
    caplog.set_level(logging.INFO, logger="moegate.training")
    train_router(config)
    training = json.loads((layout.router / "training.json").read_text())
    if change == "nothing":  # the control: the same run picks its checkpoint up (here: nothing left to train)
        assert training["resumed_from_epoch"] == 2 and "another config" not in caplog.text
    else:
        assert training["resumed_from_epoch"] == 0 and "is for another config or dataset" in caplog.text
    assert not checkpoints.exists()
    shutil.rmtree(layout.tuning, ignore_errors=True)


def _router_result(results: Path) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file

    training = json.loads((results / "router" / "training.json").read_text())
    return load_file(str(results / "router" / "model.safetensors")), training


@pytest.mark.slow
def test_train_router_killed_mid_epoch_and_mid_save_resumes_to_the_uninterrupted_result(backbone_run, tmp_path):
    """`moegate train-router` (finetune) SIGKILLed in the middle of epoch 2, then again while writing epoch 2's
    checkpoint, then run to the end: the router equals one from a run never interrupted (the checkpoint
    holds weights, optimizer, scheduler and RNG state; batch order is seeded per epoch)."""
    import shutil

    import torch
    import yaml
    from kills import run, run_and_kill

    layout = Layout.from_config(backbone_run)
    straight = tmp_path / "straight" / "results"
    shutil.copytree(layout.results, straight)  # the same dataset and backbone, byte for byte
    configs = {}
    for name, results in (("killed", layout.results), ("straight", straight)):
        config = yaml.safe_load((tmp_path / "config.yaml").read_text())
        config["results"] = str(results)
        config["router"]["epochs"] = 3
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config))
    run(["train-router", "--config", str(configs["straight"])], tmp_path / "straight.log")

    checkpoint = layout.checkpoints / "router" / "checkpoint.pt"
    mid_epoch_2 = """
import moegate.training as loop
saved = []
_save = loop.Checkpoint.save
def save(self, state):
    _save(self, state)
    saved.append(state["epoch"])
loop.Checkpoint.save = save
batches = []
_to_device = loop.to_device
def to_device(batch, device):
    if saved == [1]:  # epoch 1 is checkpointed: count epoch 2's batches
        batches.append(1)
        if len(batches) == 3:
            pause_here()
    return _to_device(batch, device)
loop.to_device = to_device
"""
    argv = ["train-router", "--config", str(configs["killed"])]
    run_and_kill(argv, mid_epoch_2, tmp_path / "mid-epoch", tmp_path / "kill1.log")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1 and not layout.router.exists()

    half_written_save = """
import io
import torch
_torch_save = torch.save
def half_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 2:  # epoch 2's checkpoint: write half of it, then hold
        buffer = io.BytesIO()
        _torch_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        pause_here()
    return _torch_save(obj, f, *args, **kwargs)
torch.save = half_save
"""
    run_and_kill(argv, half_written_save, tmp_path / "mid-save", tmp_path / "kill2.log")
    assert "resuming after epoch 1" in (tmp_path / "kill2.log").read_text()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # the half-written save never replaced it
    assert [p.name for p in checkpoint.parent.glob(".checkpoint.pt.*.tmp")]  # the half-written file, as the kill left it
    assert not layout.router.exists()

    run(argv, tmp_path / "rerun.log")
    weights, training = _router_result(layout.results)
    want_weights, want_training = _router_result(straight)
    assert training["resumed_from_epoch"] == 1 and want_training["resumed_from_epoch"] == 0
    assert [r["epoch"] for r in training["curves"]] == [r["epoch"] for r in want_training["curves"]] == [1, 2, 3]
    for got, want in zip(training["curves"], want_training["curves"]):
        for key in ("train_loss", "val_loss", "val_accuracy", "val_mean_layers", "learning_rate"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert set(weights) == set(want_weights)
    for name in weights:
        torch.testing.assert_close(weights[name], want_weights[name], rtol=0, atol=1e-6, msg=name)
    assert not checkpoint.parent.exists()  # the finished run removed its checkpoint and the half-written one


# -- router.head.last_layer: kb: the last unit's prototypes from the KB index, left as they are ----------
def _with_kb_index(config: dict, encoder: str | None = None, chunks: int = 30):
    import torch

    from moegate.retrieval import KBIndex
    from moegate.stages.states import load_states
    from moegate.training import read_labels

    layout = Layout.from_config(config)
    labels = read_labels(layout)
    hidden = load_states(config, "train").states.shape[-1]
    gen = torch.Generator().manual_seed(0)
    index = KBIndex(torch.nn.functional.normalize(torch.randn(chunks, hidden, generator=gen), dim=-1),
                    torch.arange(chunks) % len(labels), [f"c{i}" for i in range(chunks)], labels,
                    encoder or config["backbone"]["model"])
    index.save(layout.kb_index)
    return index


def test_kb_last_layer_takes_the_kb_index_and_training_leaves_it(tiny_run):
    from safetensors.torch import load_file

    from moegate.config import ConfigError

    config = _frozen(tiny_run)
    config["router"]["head"]["last_layer"] = "kb"
    with pytest.raises(ConfigError, match="last_layer: kb needs .*kb_index.safetensors"):
        train_router(config)  # a labelled CSV's dataset has no KB index
    _with_kb_index(config, encoder="some-other-encoder")
    with pytest.raises(ConfigError, match="backbone.model"):
        train_router(config)
    index = _with_kb_index(config)
    from moegate.stages.train_router import fit

    for mode in ("lpft", "finetune"):  # a fine-tuned encoder would leave the KB prototypes in another space
        with pytest.raises(ConfigError, match="encoder_mode: frozen"):
            fit({**config, "router": {**config["router"], "encoder_mode": mode}})
    summary = train_router(config)
    layout = Layout.from_config(config)
    saved = load_file(str(layout.router / "model.safetensors"))
    last = saved["classifiers.2.prototypes"]  # 3 layers: index 2 is the last
    # each expert's 4 prototypes are k-means centroids of its 10 chunks: unit vectors in their span
    for e in range(3):
        chunks = index.vectors[index.expert == e]
        protos = last[e * 4:(e + 1) * 4]
        residual = protos - protos @ torch_pinv_projector(chunks)
        assert float(residual.abs().max()) < 1e-4
    router = Router.from_pretrained(layout.router, device="cpu")
    assert router.model.head_config.last_layer == "kb"
    val = load_tokens(layout.tokens("val"))
    probs, exits = router.predict_tokens(val.input_ids, val.attention_mask)
    assert float((probs.argmax(1) == val.labels.numpy()).mean()) == pytest.approx(summary["val_accuracy"])


def torch_pinv_projector(rows):
    """The projector onto the row space of ``rows`` (k, H): x @ P is x's part in that span."""
    import torch

    return torch.linalg.pinv(rows) @ rows
