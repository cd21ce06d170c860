"""train_backbone: the contract files, reload, resume through the stage, tuned overlay, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moegate.io import write_json
from moegate.layout import Layout
from moegate.models.backbone import BackboneClassifier, classify, load_backbone_classifier
from moegate.stages.train_backbone import fit, train_backbone
from moegate.training import load_tokens


def test_train_backbone_writes_every_contract_file(tiny_run):
    layout = Layout.from_config(tiny_run)
    summary = train_backbone(tiny_run)
    out = layout.backbone
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "classifier.safetensors",
                 "labels.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["curves"]] == [1, 2]
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(metrics["curves"][0])
    test_rows = len(load_tokens(layout.tokens("test")))
    assert metrics["test"]["rows"] == test_rows and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["params"]["learning_rate"] == tiny_run["backbone"]["learning_rate"]
    assert metrics["parameters"] > 0 and metrics["wall_seconds"] > 0
    assert summary["epochs"] == 2 and summary["test_accuracy"] == metrics["test"]["accuracy"]
    assert json.loads((out / "labels.json").read_text())["labels"] == list(tiny_run["experts"])
    assert set(load_file(str(out / "classifier.safetensors"))) == {"linear.weight", "linear.bias"}
    assert not (layout.checkpoints / "backbone").exists()  # deleted once the output is written


def test_reloaded_classifier_reproduces_test_accuracy(tiny_run):
    layout = Layout.from_config(tiny_run)
    train_backbone(tiny_run)
    encoder, head, tokenizer, labels = load_backbone_classifier(layout.backbone)
    test = load_tokens(layout.tokens("test"))
    logits = classify(BackboneClassifier(encoder, head), test, 5, torch.device("cpu"))
    accuracy = (logits.argmax(-1) == test.labels).float().mean().item()
    metrics = json.loads((layout.backbone / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])
    assert labels == list(tiny_run["experts"]) and tokenizer("a question")["input_ids"][0] == 101


def test_train_backbone_resumes_a_killed_job(tiny_run):
    """A job killed after epoch 1 leaves its checkpoint; the rerun trains only epoch 2."""
    layout = Layout.from_config(tiny_run)

    class Killed(RuntimeError):
        pass

    class KillingTrial:  # the trial hook runs after the epoch's checkpoint: a kill point
        class study:  # stands in for optuna.Trial.study
            directions = (None,)

        def report(self, value, step):
            raise Killed(f"killed after epoch {step + 1}")

    with pytest.raises(Killed):
        fit(tiny_run, out_dir=layout.backbone, trial=KillingTrial(), checkpoint_dir=layout.checkpoints / "backbone")
    assert (layout.checkpoints / "backbone" / "checkpoint.pt").is_file() and not layout.backbone.exists()
    train_backbone(tiny_run)
    metrics = json.loads((layout.backbone / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and [r["epoch"] for r in metrics["curves"]] == [1, 2]


def test_tuned_values_are_applied_and_recorded(tiny_run):
    layout = Layout.from_config(tiny_run)
    write_json(layout.tuned("backbone"), {"study": "backbone", "params": {"backbone.epochs": 1,
                                                                           "backbone.dropout": 0.2}})
    train_backbone(tiny_run)
    metrics = json.loads((layout.backbone / "metrics.json").read_text())
    assert len(metrics["curves"]) == 1 and metrics["params"]["dropout"] == 0.2
    assert metrics["tuned"]["backbone"]["params"]["backbone.epochs"] == 1


def test_pruned_trial_stops_training(tiny_run):
    import optuna

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        fit(tiny_run, trial=trial)
    reported = study.trials[0].intermediate_values  # accuracy < 2.0 prunes at the first report
    assert list(reported) == [0] and 0.0 <= reported[0] <= 1.0


def test_tokens_from_another_vocabulary_are_a_clear_error(tiny_run):
    from safetensors.torch import save_file

    layout = Layout.from_config(tiny_run)
    split = load_tokens(layout.tokens("train"))
    split.input_ids[0, 1] = 10**6
    save_file({"input_ids": split.input_ids, "attention_mask": split.attention_mask, "labels": split.labels},
              str(layout.tokens("train")))
    with pytest.raises(ValueError, match=r"train\.safetensors: token id 1000000 outside the vocabulary"):
        fit(tiny_run)


def test_missing_backbone_file_is_named(tiny_run):
    layout = Layout.from_config(tiny_run)
    train_backbone(tiny_run)
    (layout.backbone / "classifier.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="classifier.safetensors: missing"):
        load_backbone_classifier(layout.backbone)
