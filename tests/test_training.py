"""The shared training loop: optimizer groups, schedule, padding trim, real training, checkpoints and resume."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from moegate.layout import Layout
from moegate.models.backbone import BackboneClassifier, ClassifierHead
from moegate.training import (
    Checkpoint,
    LoopSettings,
    TokenSplit,
    linear_warmup_decay,
    load_tokens,
    parameter_groups,
    train,
    trim_padding,
)


class Killed(RuntimeError):
    """Stands in for SIGTERM / a Slurm time limit arriving between epochs."""


def make_model(tiny_bert_dir, seed: int = 0) -> BackboneClassifier:
    """The tiny BERT with weights drawn from ``seed`` (the session fixture's own weights are unseeded)."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir))
    return BackboneClassifier(encoder, ClassifierHead(encoder.config.hidden_size, 3, dropout=0.1))


def splits(config) -> dict[str, TokenSplit]:
    layout = Layout.from_config(config)
    return {s: load_tokens(layout.tokens(s)) for s in ("train", "val")}


def ce_step(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def validator(split: TokenSplit):
    def validate(model):
        losses = [ce_step(model, b).item() * len(b["labels"]) for b in split.batches(16)]
        return {"val_loss": sum(losses) / len(split)}

    return validate


def settings(**kw) -> LoopSettings:
    base = {"learning_rate": 1e-3, "weight_decay": 0.01, "batch_size": 8, "epochs": 2, "warmup_ratio": 0.1,
                "max_grad_norm": 1.0, "patience": 2, "seed": 0}
    return LoopSettings(**{**base, **kw})


def test_parameter_groups_exempt_bias_and_layernorm(tiny_bert_dir):
    model = make_model(tiny_bert_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, 0.01, learning_rate=1e-4, head_learning_rate=1e-3)
    by_setting = {(g["lr"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_setting) == {(1e-4, 0.01), (1e-4, 0.0), (1e-3, 0.01), (1e-3, 0.0)}
    decayed = by_setting[(1e-4, 0.01)] | by_setting[(1e-3, 0.01)]
    exempt = by_setting[(1e-4, 0.0)] | by_setting[(1e-3, 0.0)]
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decayed)
    assert "encoder.embeddings.LayerNorm.weight" in exempt and "head.linear.bias" in exempt
    assert "encoder.encoder.layer.0.attention.self.query.weight" in by_setting[(1e-4, 0.01)]
    assert by_setting[(1e-3, 0.01)] == {"head.linear.weight"} and by_setting[(1e-3, 0.0)] == {"head.linear.bias"}
    assert len(decayed) + len(exempt) == len(list(model.parameters()))
    # without a head learning rate everything shares one rate
    assert {g["lr"] for g in parameter_groups(model, 0.01, learning_rate=1e-4)} == {1e-4}


def test_linear_warmup_then_decay():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == sorted(lrs[:5]) and lrs[0] < lrs[4]  # rising during warm-up
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.1  # then falling towards 0


def test_trim_padding_drops_only_trailing_all_pad_columns():
    batch = {"input_ids": torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]), "labels": torch.tensor([0, 1])}
    out = trim_padding(batch)
    assert out["input_ids"].tolist() == [[5, 6, 0], [5, 6, 7]]
    assert out["attention_mask"].shape == (2, 3) and out["labels"].tolist() == [0, 1]


def test_batches_cover_every_row_once_and_drop_only_a_lone_last_row():
    n = 17
    split = TokenSplit(torch.ones(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long), torch.arange(n))
    seen = torch.cat([b["labels"] for b in split.batches(8, torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(n))
    kept = torch.cat([b["labels"] for b in split.batches(8, torch.Generator().manual_seed(1), drop_single=True)])
    assert len(kept) == 16 and split.num_batches(8, drop_single=True) == 2


def test_load_tokens_names_file_and_missing_tensor(tmp_path):
    path = tmp_path / "train.safetensors"
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.int64)}, str(path))
    with pytest.raises(ValueError, match=r"train\.safetensors.*missing tensors \['attention_mask', 'labels'\]"):
        load_tokens(path)
    with pytest.raises(FileNotFoundError, match="dataset stage"):
        load_tokens(tmp_path / "val.safetensors")


def test_training_lowers_the_training_loss(tiny_run, tiny_bert_dir):
    data = splits(tiny_run)
    model = make_model(tiny_bert_dir)
    before = validator(data["train"])(model.eval())["val_loss"]
    result = train(model, data["train"], ce_step, validator(data["val"]), settings(epochs=6, learning_rate=3e-3),
                   torch.device("cpu"))
    after = validator(data["train"])(model.eval())["val_loss"]
    assert after < before - 0.3, (before, after)  # ~1.1 (chance, 3 experts) -> ~0.2 with seed 0
    assert [r["epoch"] for r in result.curves] == [1, 2, 3, 4, 5, 6]
    assert result.best == min(result.curves, key=lambda r: r["val_loss"])


def test_killed_run_resumes_from_last_epoch_with_identical_state(tiny_run, tiny_bert_dir, tmp_path):
    data = splits(tiny_run)
    cpu = torch.device("cpu")

    straight = make_model(tiny_bert_dir)
    full = train(straight, data["train"], ce_step, validator(data["val"]), settings(), cpu)

    ckpt = Checkpoint(tmp_path / "ckpt", fingerprint="run-a")

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise Killed("time limit")

    with pytest.raises(Killed):
        train(make_model(tiny_bert_dir), data["train"], ce_step, validator(data["val"]), settings(), cpu,
              checkpoint=ckpt, on_epoch_end=kill_after_first)
    assert ckpt.path.exists()

    epochs_run = []
    resumed = make_model(tiny_bert_dir, seed=123)  # other initial weights: the checkpoint must replace them
    again = train(resumed, data["train"], ce_step, validator(data["val"]), settings(), cpu, checkpoint=ckpt,
                  on_epoch_end=lambda e, r: epochs_run.append(e))
    assert again.resumed_from == 1 and epochs_run == [2]
    assert [r["epoch"] for r in again.curves] == [1, 2]
    for a, b in zip(full.curves, again.curves):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_fingerprint_mismatch_starts_fresh(tiny_run, tiny_bert_dir, tmp_path, caplog):
    data = splits(tiny_run)
    cpu = torch.device("cpu")
    ckpt_dir = tmp_path / "ckpt"
    train(make_model(tiny_bert_dir), data["train"], ce_step, validator(data["val"]), settings(epochs=1), cpu,
          checkpoint=Checkpoint(ckpt_dir, "config-a"))
    caplog.set_level(logging.INFO, logger="moegate.training")
    result = train(make_model(tiny_bert_dir), data["train"], ce_step, validator(data["val"]), settings(epochs=1),
                   cpu, checkpoint=Checkpoint(ckpt_dir, "config-b"))
    assert result.resumed_from == 0 and len(result.curves) == 1
    assert "another config or dataset" in caplog.text and "starting fresh" in caplog.text
    # the new run's checkpoint replaced the old one
    assert Checkpoint(ckpt_dir, "config-b").load()["epoch"] == 1
    assert Checkpoint(ckpt_dir, "config-a").load() is None


def test_early_stopping_restores_best_weights(tiny_run, tiny_bert_dir):
    data = splits(tiny_run)
    losses = iter([1.0, 0.5, 0.9, 0.8, 0.7])  # best at epoch 2, no improvement for 2 epochs after it
    snapshots = {}

    def validate(model):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val_loss": next(losses)}

    model = make_model(tiny_bert_dir)
    result = train(model, data["train"], ce_step, validate, settings(epochs=5, patience=2), torch.device("cpu"))
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[2][name], rtol=0, atol=0, msg=name)


def test_nonfinite_loss_is_a_clear_error(tiny_run, tiny_bert_dir):
    data = splits(tiny_run)
    with pytest.raises(FloatingPointError, match="epoch 1: training loss is nan"):
        train(make_model(tiny_bert_dir), data["train"], lambda m, b: torch.tensor(float("nan")),
              validator(data["val"]), settings(epochs=1), torch.device("cpu"))


def test_loop_settings_from_a_config_section():
    s = LoopSettings.from_section({"model": "ignored", "head": {}, "learning_rate": 1, "epochs": 3.0,
                                   "head_learning_rate": None, "patience": 1}, seed=7)
    assert (s.learning_rate, s.epochs, s.head_learning_rate, s.patience, s.seed) == (1.0, 3, None, 1, 7)
    assert isinstance(s.learning_rate, float) and isinstance(s.epochs, int)
    assert LoopSettings.from_section({"head_learning_rate": 0.003}, seed=0).head_learning_rate == 0.003
    with pytest.raises(ValueError, match="batch_size: expected int, got 'many'"):
        LoopSettings.from_section({"batch_size": "many"}, seed=0)
