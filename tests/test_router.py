"""The public router API: save_router → Router.from_pretrained → route / predict, and the route CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from moegate.models.dact import DactRouterModel, HeadConfig
from moegate.router import (
    FORMAT_VERSION,
    MODEL_TYPE,
    Router,
    RouterError,
    RouteResult,
    save_router,
    write_model_card,
)

LABELS = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]
MAX_LENGTH = 32
ODD_TEXTS = [
    "",
    "   \n\t ",
    "word " * 5000,
    "什么是线性回归？",
    "ما هو الانحدار الخطي؟",
    "🤖📊❓ " * 3,
    "What is a p-value?",
]


def build_model(backbone_dir: Path, seed: int = 1) -> DactRouterModel:
    """A DACT model on a tiny random backbone whose rows exit at different layers.

    All the backbone's matrices are re-drawn from ``seed`` (the fixture's own init is unseeded), larger
    than HF's std 0.02, which leaves [CLS] almost the same for every input; the heads are random with
    halting biased towards early exits. Seed 1 spreads the test questions over all three exit layers.
    """
    torch.manual_seed(seed)
    model = DactRouterModel(AutoModel.from_pretrained(backbone_dir), len(LABELS),
                            HeadConfig(projection_dim=16, width=16))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embeddings" in name else 1.5 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for module in [model.projection, *model.classifiers, *model.halting]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[-1] ** 0.5)
        for g in model.halting:
            g.output.bias.fill_(-1.0)
    return model.eval()


def save(backbone_dir: Path, out: Path, **kwargs) -> tuple[Path, DactRouterModel]:
    model = build_model(backbone_dir)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    args = {
        "labels": LABELS,
        "max_length": MAX_LENGTH,
        "ponder_cost": 0.05,
        "metadata": {"backbone_model": "tiny-random-bert", "training": {"epochs": 1}, "studies": {},
                     "val": {"accuracy": 0.75, "mean_layers": 1.5}},
        "extra_json": {"training.json": {"epochs": [{"epoch": 1, "val_loss": 1.0}]}},
        **kwargs,
    }
    save_router(out, model, tokenizer, **args)
    return out, model


@pytest.fixture(scope="module")
def saved(tiny_bert_dir, tmp_path_factory):
    return save(tiny_bert_dir, tmp_path_factory.mktemp("saved") / "router")


@pytest.fixture(scope="module")
def router(saved) -> Router:
    return Router.from_pretrained(saved[0], device="cpu")


def broken_copy(saved_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "router"
    shutil.copytree(saved_dir, dst)
    return dst


# -- saving ----------------------------------------------------------------------------------------------
def test_router_directory_holds_the_contracted_files(saved):
    path, model = saved
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "training.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    config = json.loads((path / "config.json").read_text())
    assert config["labels"] == LABELS and config["num_layers"] == model.num_layers == 3
    assert config["max_length"] == MAX_LENGTH and config["ponder_cost"] == 0.05
    assert config["head"] == model.head_config.to_dict()
    assert config["backbone"]["model_type"] == "bert" and config["backbone"]["hidden_size"] == 32
    assert "(1 - p_n)^d" in config["exit_rule"]["formula"]
    assert config["metadata"]["backbone_model"] == "tiny-random-bert"
    assert json.loads((path / "training.json").read_text())["epochs"][0]["epoch"] == 1
    card = (path / "README.md").read_text()
    assert all(label in card for label in LABELS) and "Router.from_pretrained" in card


def test_router_directory_reads_like_a_hugging_face_model_directory(saved, tmp_path):
    from transformers import AutoConfig

    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["moegate_router"] == FORMAT_VERSION == 2
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}
    backbone = AutoConfig.from_pretrained(path, subfolder="backbone")  # plain transformers, no moegate
    assert backbone.model_type == "bert" and backbone.hidden_size == 32 and backbone.num_hidden_layers == 3
    assert "backbone" not in config["tokenizer_files"]
    card = (path / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "moegate" and front["base_model"] == "tiny-random-bert"
    assert "early-exit" in front["tags"]
    [val] = front["model-index"][0]["results"]
    assert val["dataset"]["split"] == "validation"
    assert {m["type"]: m["value"] for m in val["metrics"]} == {"accuracy": 0.75, "mean_exit_layer": 1.5}

    # the evaluate stage rewrites the card with the test split's metrics
    copy = broken_copy(path, tmp_path)
    write_model_card(copy, {"router_early_exit": {"accuracy": 0.8125, "mean_layers": 2.0}})
    front = yaml.safe_load((copy / "README.md").read_text().split("---\n")[1])
    test = front["model-index"][0]["results"][1]
    assert test["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in test["metrics"]} == {"accuracy": 0.8125, "mean_exit_layer": 2.0}
    assert Router.from_pretrained(copy, device="cpu").labels == LABELS  # the card is no part of the checks


def test_format_1_directories_load_and_unknown_formats_are_refused(saved, router, tmp_path):
    path = broken_copy(saved[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    for key in ("model_type", "id2label", "label2id"):  # format 1 had none of these, nor backbone/
        del config[key]
    config["moegate_router"] = 1
    (path / "config.json").write_text(json.dumps(config))
    shutil.rmtree(path / "backbone")
    old = Router.from_pretrained(path, device="cpu")
    texts = ["What is a p-value?", "backpropagation through a convolution"]
    assert [r.to_dict() for r in old.route(texts)] == [r.to_dict() for r in router.route(texts)]
    write_model_card(path)  # a format-1 card can be rewritten too

    config["moegate_router"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouterError, match=r"router format 3, this moegate .* reads formats 1, 2; upgrade moegate"):
        Router.from_pretrained(path, device="cpu")
    config.update(moegate_router=2, model_type="bert")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouterError, match="key 'model_type' is 'bert', expected 'moegate-dact-router'"):
        Router.from_pretrained(path, device="cpu")
    config.update(model_type=MODEL_TYPE, id2label={"0": LABELS[1], "1": LABELS[0], "2": LABELS[2]})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouterError, match="key 'id2label' .* does not match 'labels'"):
        Router.from_pretrained(path, device="cpu")


def test_a_router_saved_with_lambda_before_the_rename_loads(saved, router, tmp_path):
    """config.json of routers saved before router.lambda_ became router.ponder_cost says ``lambda_``."""
    path = broken_copy(saved[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["lambda_"] = config.pop("ponder_cost")
    (path / "config.json").write_text(json.dumps(config))
    old = Router.from_pretrained(path, device="cpu")
    assert old.ponder_cost == 0.05 and old.config["ponder_cost"] == 0.05 and "lambda_" not in old.config
    texts = ["What is a p-value?", "backpropagation through a convolution"]
    assert [r.to_dict() for r in old.route(texts)] == [r.to_dict() for r in router.route(texts)]
    assert "ponder cost λ = 0.05" in write_model_card(path).read_text()


def test_saving_again_replaces_the_directory(tiny_bert_dir, tmp_path):
    path, _ = save(tiny_bert_dir, tmp_path / "router")
    (path / "stale.txt").write_text("from an older run")
    save(tiny_bert_dir, path, extra_json=None)
    assert not (path / "stale.txt").exists() and not (path / "training.json").exists()
    assert Router.from_pretrained(path, device="cpu").labels == LABELS


def test_save_router_checks_its_arguments(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="2 labels for a model with 3 experts"):
        save(tiny_bert_dir, tmp_path / "a", labels=LABELS[:2])
    with pytest.raises(ValueError, match="extra_json key 'config.json'"):
        save(tiny_bert_dir, tmp_path / "b", extra_json={"config.json": {}})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- loading ---------------------------------------------------------------------------------------------
def test_loaded_router_predicts_like_the_trained_model(saved, router):
    path, model = saved
    assert router.labels == LABELS and router.num_layers == 3 and router.max_length == MAX_LENGTH
    texts = ["what is gradient descent", "plot a histogram", "mean and median", ""]
    enc = AutoTokenizer.from_pretrained(path)(texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                                              return_tensors="pt")
    want_probs, want_layers = model.early_exit(enc["input_ids"], enc["attention_mask"])
    probs, layers = router.predict(texts)
    np.testing.assert_allclose(probs, want_probs.numpy(), atol=1e-6)
    assert layers.tolist() == want_layers.tolist()


def test_public_import():
    import moegate

    assert moegate.Router is Router and moegate.RouteResult is RouteResult


def test_distilbert_router_round_trip(tiny_distilbert_dir, tmp_path):
    path, _ = save(tiny_distilbert_dir, tmp_path / "router")
    loaded = Router.from_pretrained(path, device="cpu")
    assert loaded.model.model_type == "distilbert" and loaded.num_layers == 2
    results = loaded.route(ODD_TEXTS)
    assert [r.expert in LABELS for r in results] == [True] * len(ODD_TEXTS)


@pytest.mark.parametrize("remove,message", [
    ("model.safetensors", r"model\.safetensors: missing"),
    ("config.json", r"config\.json: missing"),
    ("tokenizer_config.json", r"tokenizer_config\.json: missing"),
])
def test_missing_files_are_named(saved, tmp_path, remove, message):
    path = broken_copy(saved[0], tmp_path)
    (path / remove).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        Router.from_pretrained(path, device="cpu")


def test_mismatched_weights_name_the_file_and_keys(saved, tmp_path):
    path = broken_copy(saved[0], tmp_path)
    state = load_file(path / "model.safetensors")
    state["classifiers.0.3.weight"] = state["classifiers.0.3.weight"][:2].contiguous()  # 2 experts, not 3
    del state["halting.2.3.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        Router.from_pretrained(path, device="cpu")
    text = str(err.value)
    assert "model.safetensors" in text and "classifiers.0.3.weight: file (2, 16) vs model (3, 16)" in text
    assert "missing tensors" in text and "halting.2.3.bias" in text
    assert "unexpected tensors" in text and "extra.weight" in text


def test_unreadable_or_foreign_files_are_clear_errors(saved, tmp_path, tiny_bert_dir):
    path = broken_copy(saved[0], tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Router.from_pretrained(path, device="cpu")
    with pytest.raises(ValueError, match="is this a backbone directory"):
        Router.from_pretrained(tiny_bert_dir, device="cpu")
    config = json.loads((saved[0] / "config.json").read_text())
    config["labels"] = "dsci_101"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="key 'labels' must be a list"):
        Router.from_pretrained(path, device="cpu")
    with pytest.raises(FileNotFoundError, match="router directory not found"):
        Router.from_pretrained(tmp_path / "nowhere")


# -- routing ---------------------------------------------------------------------------------------------
def test_odd_inputs_route_without_crashing(router):
    results = router.route(ODD_TEXTS)
    assert len(results) == len(ODD_TEXTS)
    for r in results:
        assert r.expert in LABELS and 0.0 <= r.probability <= 1.0 and 1 <= r.exit_layer <= router.num_layers
        assert next(iter(r.distribution)) == r.expert and r.probability == r.distribution[r.expert]
        assert abs(sum(r.distribution.values()) - 1.0) < 1e-5
        json.dumps(r.to_dict())
    # a very long question is its first max_length tokens
    long, truncated = router.route(["word " * 5000, "word " * (MAX_LENGTH + 5)])
    assert long == truncated
    assert router.route([]) == []


def test_results_do_not_depend_on_batching(router):
    texts = ODD_TEXTS + [f"question {i} about {w}" for i, w in enumerate(["data", "models", "plots"] * 4)]
    one_batch = router.predict(texts, batch_size=64)
    small_batches = router.predict(texts, batch_size=2)
    assert len(set(one_batch[1].tolist())) > 1, "rows should leave at different layers"
    np.testing.assert_allclose(small_batches[0], one_batch[0], atol=1e-5)
    assert small_batches[1].tolist() == one_batch[1].tolist()


def test_early_exit_agrees_with_full_depth(router):
    texts = ODD_TEXTS + [f"question {i} about {w}" for i, w in enumerate(["data", "models", "plots", "tests"] * 8)]
    probs, layers = router.predict(texts)
    full, full_layers = router.predict(texts, early_exit=False)
    assert (probs.argmax(1) == full.argmax(1)).all()
    assert set(full_layers.tolist()) == {router.num_layers}
    assert layers.min() >= 1 and layers.max() <= router.num_layers
    assert len(set(layers.tolist())) > 1 and len(set(probs.argmax(1).tolist())) > 1, "test model too uniform"


def test_predict_tokens_matches_predict_on_max_length_padding(router):
    texts = ["short", "a somewhat longer question about neural networks", ""]
    enc = router.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    probs, layers = router.predict_tokens(enc["input_ids"], enc["attention_mask"], batch_size=2)
    want = router.predict(texts)
    np.testing.assert_allclose(probs, want[0], atol=1e-5)
    assert layers.tolist() == want[1].tolist()


def test_top_k_and_abstain(router):
    texts = ["what is a confidence interval", "explain backpropagation"]
    full = router.route(texts)
    top1 = router.route(texts, top_k=1)
    assert [list(r.distribution) for r in top1] == [[r.expert] for r in full]
    assert [len(r.distribution) for r in router.route(texts, top_k=10)] == [3, 3]
    highest = max(r.probability for r in full)
    abstained = router.route(texts, abstain_below=min(1.0, highest + 1e-6))
    assert [r.expert for r in abstained] == [None, None]
    assert [r.probability for r in abstained] == [r.probability for r in full]  # still reported
    assert [r.expert for r in router.route(texts, abstain_below=0.0)] == [r.expert for r in full]
    with pytest.raises(ValueError, match="top_k"):
        router.route(texts, top_k=0)
    with pytest.raises(ValueError, match="abstain_below"):
        router.route(texts, abstain_below=1.5)


def test_saved_abstain_threshold_is_the_default(tiny_bert_dir, tmp_path):
    path, _ = save(tiny_bert_dir, tmp_path / "router", abstain_below=1.0)
    gate = Router.from_pretrained(path, device="cpu")
    assert gate.route(["anything"])[0].expert is None
    assert gate.route(["anything"], abstain_below=0.0)[0].expert in LABELS


def test_route_takes_a_string_or_a_list_of_strings(router):
    one = router.route("what is a p-value?")
    assert isinstance(one, RouteResult) and one == router.route(["what is a p-value?"])[0]
    with pytest.raises(TypeError, match="wrap a single question in a list"):
        router.predict("what is a p-value?")  # predict's rows stay a list
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a string, got NoneType"):
        router.route(["ok", None])


def test_route_cli_prints_one_json_object_per_question(saved):
    from moegate.cli import app

    result = CliRunner().invoke(app, ["route", "--router", str(saved[0]), "--top-k", "2",
                                      "what is a p-value?", "什么是神经网络"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [x["question"] for x in lines] == ["what is a p-value?", "什么是神经网络"]
    for x in lines:
        assert x["expert"] in LABELS and len(x["distribution"]) == 2 and 1 <= x["exit_layer"] <= 3


def test_max_length_beyond_the_backbone_is_lowered(tiny_bert_dir, tmp_path):
    path, _ = save(tiny_bert_dir, tmp_path / "router", max_length=100_000)
    gate = Router.from_pretrained(path, device="cpu")
    assert gate.max_length == 128  # the tiny backbone's position embeddings
    assert gate.route(["word " * 1000])[0].expert in LABELS


def test_route_cli_names_a_broken_router_dir(saved, tmp_path):
    from moegate.cli import app

    path = broken_copy(saved[0], tmp_path)
    (path / "model.safetensors").unlink()
    result = CliRunner().invoke(app, ["route", "--router", str(path), "a question"])
    assert result.exit_code == 2 and "model.safetensors: missing" in result.output


# -- damaged routers do not route --------------------------------------------------------------------
def test_a_deleted_tokenizer_file_is_named_not_replaced_by_a_fallback(saved, tmp_path):
    from moegate.router import RouterError

    path = broken_copy(saved[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert "tokenizer.json" in config["tokenizer_files"] and config["tokenizer_vocab_size"] == 30522
    (path / "tokenizer.json").unlink()  # HF would load a 5-token vocabulary: every word [UNK]
    with pytest.raises(FileNotFoundError, match=r"router/tokenizer\.json: missing.*fall back") as err:
        Router.from_pretrained(path, device="cpu")
    assert isinstance(err.value, RouterError)


def test_a_router_saved_without_the_tokenizer_record_still_checks_the_vocabulary(saved, tmp_path):
    from moegate.router import RouterError

    path = broken_copy(saved[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["tokenizer_files"], config["tokenizer_vocab_size"]  # as saved before they were recorded
    (path / "config.json").write_text(json.dumps(config))
    assert Router.from_pretrained(path, device="cpu").route(["what is a p-value?"])[0].expert in LABELS
    (path / "tokenizer.json").unlink()
    with pytest.raises(RouterError, match=rf"{path}: the tokenizer loaded from it has 5 tokens, the backbone's "
                                          r"embedding rows 30522.*tokenizer_config\.json"):
        Router.from_pretrained(path, device="cpu")


def test_a_tokenizer_of_another_size_than_saved_is_refused(saved, tmp_path):
    from moegate.router import RouterError

    path = broken_copy(saved[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["tokenizer_vocab_size"] = 28996  # the tokenizer files were swapped for another model's
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouterError, match=r"has 30522 tokens, config\.json records 28996"):
        Router.from_pretrained(path, device="cpu")


def test_save_refuses_a_tokenizer_larger_than_the_embeddings(tiny_bert_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tokenizer.add_tokens(["p-value-token"])
    with pytest.raises(ValueError, match="30523 tokens, the backbone only 30522 embedding rows"):
        save_router(tmp_path / "router", build_model(tiny_bert_dir), tokenizer, LABELS, MAX_LENGTH, 0.05, {})
    assert not (tmp_path / "router").exists()


def test_nonfinite_weights_are_refused_naming_the_tensor(saved, tmp_path):
    from moegate.router import RouterError

    path = broken_copy(saved[0], tmp_path)
    state = load_file(path / "model.safetensors")
    state["halting.1.3.bias"] = torch.full_like(state["halting.1.3.bias"], float("nan"))
    state["classifiers.0.3.weight"][0, :2] = float("inf")
    save_file(state, path / "model.safetensors")
    with pytest.raises(RouterError, match=r"model\.safetensors: NaN or infinite values in tensor\(s\) "
                                          r".*classifiers\.0\.3\.weight \(2 of 48 values\).*halting\.1\.3\.bias"):
        Router.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("damage", ["random tail", "one finite value"])
def test_damaged_weight_bytes_are_refused(saved, tmp_path, damage):
    from moegate.router import RouterError

    path = broken_copy(saved[0], tmp_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "random tail":
        tail = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        data[-len(tail):] = tail
    else:  # a value changed to another ordinary float: only the recorded sha256 can tell
        data[-4:] = np.float32(0.125).tobytes()
    weights.write_bytes(bytes(data))
    with pytest.raises(RouterError, match=r"model\.safetensors: (NaN or infinite values|its sha256 differs)"):
        Router.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("rule,message", [
    ({"name": "dact_bound_v2", "formula": "whatever"},
     r"exit_rule 'dact_bound_v2' is not a rule this moegate implements \(known: 'dact_bound'\)"),
    ("dact_bound", r"exit_rule 'dact_bound' has formula None"),
    ({"name": "dact_bound", "formula": "a_n[c*] * (1 - p_n)^(d-1) >= a_n[c_ru] + (d-1) * p_n"},
     r"exit_rule 'dact_bound' has formula .*\(d-1\).*but this moegate's dact_bound is"),
    (None, r"exit_rule None is not a rule"),
])
def test_an_exit_rule_the_code_does_not_implement_is_refused(saved, tmp_path, rule, message):
    from moegate.router import RouterError

    path = broken_copy(saved[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["exit_rule"] = rule
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouterError, match=rf"config\.json: {message}"):
        Router.from_pretrained(path, device="cpu")


def test_route_never_returns_nan(saved):
    from moegate.router import RouterError

    gate = Router.from_pretrained(saved[0], device="cpu")
    with torch.no_grad():  # weights that pass the load but overflow: the outputs are checked too
        gate.model.classifiers[1].output.bias.fill_(float("nan"))
    texts = ODD_TEXTS + [f"question {i} about {w}" for i, w in enumerate(["data", "models", "plots"] * 4)]
    _, layers = Router.from_pretrained(saved[0], device="cpu").predict(texts)
    reached = [i for i, n in enumerate(layers) if n >= 2]  # rows that read the NaN layer-2 classifier
    assert 0 < len(reached) < len(texts), layers
    with pytest.raises(RouterError, match=rf"NaN or infinite probabilities for {len(reached)} of {len(texts)} rows"):
        gate.route(texts, abstain_below=0.5)
    results = gate.route([texts[i] for i in range(len(texts)) if i not in reached], abstain_below=0.5)
    assert all(np.isfinite(r.probability) for r in results)


def test_route_cli_reads_one_question_a_line_from_stdin(saved, monkeypatch):
    from moegate import cli
    from moegate.cli import app

    monkeypatch.setattr(cli, "STDIN_BATCH", 2)  # three batches: the first lines print before the last are read
    lines = "what is a p-value?\n\n  什么是神经网络  \nplots\nlayers\n"
    result = CliRunner().invoke(app, ["route", "--router", str(saved[0]), "-"], input=lines)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["question"] for r in rows] == ["what is a p-value?", "什么是神经网络", "plots", "layers"]
    want = Router.from_pretrained(saved[0], device="cpu").route([r["question"] for r in rows])
    assert [r["expert"] for r in rows] == [w.expert for w in want]
    bad = CliRunner().invoke(app, ["route", "--router", str(saved[0]), "--top-k", "0", "-"], input="q\n")
    assert bad.exit_code == 2 and "top_k" in bad.output and not bad.stdout.strip()


def test_route_cli_refuses_a_damaged_router(saved, tmp_path):
    from moegate.cli import app

    path = broken_copy(saved[0], tmp_path)
    state = load_file(path / "model.safetensors")
    state["halting.0.3.bias"] = torch.full_like(state["halting.0.3.bias"], float("nan"))
    save_file(state, path / "model.safetensors")
    result = CliRunner().invoke(app, ["route", "--router", str(path), "--abstain-below", "0.5", "a question"])
    assert result.exit_code == 2 and "halting.0.3.bias" in result.output and not result.stdout.strip()


def test_a_save_swapped_in_while_loading_is_loaded_whole(tiny_bert_dir, tmp_path):
    """Files read across a swap would mix two versions: the loader notices the new directory and loads again."""
    path, _ = save(tiny_bert_dir, tmp_path / "router", ponder_cost=0.05)
    real_load, calls = Router._load.__func__, []

    def load_then_resave(cls, p, device):
        router = real_load(cls, p, device)
        calls.append(router.ponder_cost)
        if len(calls) == 1:  # a new training run finishes while this one reads
            save(tiny_bert_dir, path, ponder_cost=0.5)
        return router

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Router, "_load", classmethod(load_then_resave))
        gate = Router.from_pretrained(path, device="cpu")
    assert calls == [0.05, 0.5] and gate.ponder_cost == 0.5
