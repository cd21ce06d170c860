"""Calibrated abstention: the threshold rule, the kb_similarity score, and routers that carry them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_router import LABELS, MAX_LENGTH, build_model
from transformers import AutoTokenizer

from moegate.abstain import abstain_rate, auroc, kb_index_from_states, kb_similarity, threshold_for_rate
from moegate.router import Router, RouterError, RouterFileMissing, save_router

KB_TEXTS = ["the median of a sample", "variance and the mean", "backpropagation through a layer",
            "the gradient of a neuron", "a scatterplot with a legend", "a colour palette for a chart"]
KB_EXPERTS = [0, 0, 1, 1, 2, 2]
OTHER_TEXTS = ["how long should I boil an egg", "who won the world cup", "tell me a joke please"]


@pytest.mark.parametrize("n", [1, 7, 50, 91, 100, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.02, 0.1, 0.5])
def test_threshold_abstains_on_at_most_the_rate(n, rate):
    scores = np.random.default_rng(n).normal(size=n)
    t = threshold_for_rate(scores, rate)
    abstained = abstain_rate(scores, t)
    assert abstained <= rate + 1e-12
    assert abstained == np.floor(rate * n + 1e-9) / n or n == 1  # exactly the allowed count: no tie here
    assert abstain_rate(scores + 1e-7, t) == abstained  # recomputing a score in another batch moves no question


def test_threshold_rule_by_hand_and_its_errors():
    assert threshold_for_rate([0.5, 0.1, 0.3, 0.9], 0.25) == pytest.approx(0.2)  # one may abstain: between 0.1, 0.3
    assert threshold_for_rate([0.5, 0.1, 0.3, 0.9], 0.0) == pytest.approx(0.1 - 1e-6)
    assert threshold_for_rate([0.2, 0.2, 0.2], 0.5) == 0.2  # ties are kept: none abstains
    for bad, match in (([], "no in-domain"), ([0.1, float("nan")], "NaN"), ([0.1], "max_in_domain_rate")):
        with pytest.raises(ValueError, match=match):
            threshold_for_rate(bad, 1.0 if match == "max_in_domain_rate" else 0.02)
    assert abstain_rate([0.1, float("nan"), 0.9], 0.5) == pytest.approx(2 / 3)  # NaN abstains, like route()
    assert abstain_rate([0.1], None) == 0.0


def test_auroc_by_hand():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.9], [0.5]) == 0.75  # a tie counts a half
    assert auroc([], [0.1]) is None


def test_kb_similarity_is_the_best_experts_mean_top_k_cosine():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    index = kb_index_from_states(states, torch.tensor([0, 1, 1]), ["a", "b"], ["x", "y", "z"])
    assert torch.allclose(index.vectors.norm(dim=1), torch.ones(3))
    query = torch.tensor([[2.0, 0.0]])  # cos 1 to x (expert a); cos 0 and 0.707 to expert b
    assert kb_similarity(index, query, 1) == pytest.approx([1.0])
    assert kb_similarity(index, query, 2) == pytest.approx([1.0])  # a has one row: its mean is that row
    assert kb_similarity(index, torch.tensor([[0.0, 1.0]]), 2) == pytest.approx([(1 + 0.5**0.5) / 2])
    assert kb_similarity(index, torch.zeros(0, 2), 3).shape == (0,)


def kb_router(backbone_dir, out, threshold=None, top_k=1):
    """A tiny router that abstains on kb_similarity, with KB_TEXTS as its knowledge base."""
    model = build_model(backbone_dir)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    enc = tokenizer(KB_TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        last = model.states(enc["input_ids"], enc["attention_mask"])[-1]
    index = kb_index_from_states(last, torch.tensor(KB_EXPERTS), LABELS, [f"kb:{i}" for i in range(len(KB_TEXTS))])
    save_router(out, model, tokenizer, LABELS, MAX_LENGTH, 0.05, {"backbone_model": "tiny"},
                abstain={"score": "kb_similarity", "threshold": threshold, "top_k": top_k,
                         "max_in_domain_rate": None}, kb_index=index)
    return out


def test_a_kb_similarity_router_abstains_on_what_its_kb_does_not_hold(tiny_bert_dir, tmp_path):
    probe = Router.from_pretrained(kb_router(tiny_bert_dir, tmp_path / "probe"), device="cpu")
    others = [r.kb_similarity for r in probe.route(OTHER_TEXTS)]
    assert max(others) < 0.999, others  # the tiny random encoder tells these texts apart from the KB
    threshold = (1 + max(others)) / 2
    gate = Router.from_pretrained(kb_router(tiny_bert_dir, tmp_path / "router", threshold), device="cpu")
    assert gate.abstain_score == "kb_similarity" and gate.abstain_below == pytest.approx(threshold)
    inside, outside = gate.route(KB_TEXTS), gate.route(OTHER_TEXTS)
    assert all(r.expert in LABELS and r.kb_similarity == pytest.approx(1.0, abs=1e-5) for r in inside)
    assert [r.expert for r in outside] == [None] * len(OTHER_TEXTS)
    assert all(r.expert in LABELS for r in gate.route(OTHER_TEXTS, abstain_below=-1.0))
    # the answer and its exit layer are the early exit's, though every row ran all layers for the score
    probs, layers = gate.predict(OTHER_TEXTS)
    assert [r.exit_layer for r in outside] == layers.tolist()
    np.testing.assert_allclose([r.probability for r in outside], probs.max(1), atol=1e-6)
    with pytest.raises(ValueError, match=r"abstain_below: expected a cosine in \[-1, 1\]"):
        gate.route("x", abstain_below=-2)
    config = json.loads((tmp_path / "router" / "config.json").read_text())
    assert config["abstain"]["kb_rows"] == len(KB_TEXTS) and "kb_index.safetensors" not in config["tokenizer_files"]
    assert "kb_similarity <" in (tmp_path / "router" / "README.md").read_text()


def test_a_missing_or_damaged_kb_index_is_refused(tiny_bert_dir, tmp_path):
    path = kb_router(tiny_bert_dir, tmp_path / "router", threshold=0.5)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "kb_index.safetensors").unlink()
    with pytest.raises(RouterFileMissing, match=r"kb_index\.safetensors: missing"):
        Router.from_pretrained(broken, device="cpu")
    shutil.copy(path / "kb_index.safetensors", broken / "kb_index.safetensors")
    with (broken / "kb_index.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x00\x80\x7f" * 2)  # NaN bytes in the last vector
    with pytest.raises(RouterError, match="sha256 differs from abstain.kb_index_sha256"):
        Router.from_pretrained(broken, device="cpu")
    config = json.loads((path / "config.json").read_text())
    config["abstain"]["score"] = "margin"  # a score a newer moegate might compute
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouterError, match="abstain score 'margin' is not one this moegate computes"):
        Router.from_pretrained(broken, device="cpu")


def test_routers_saved_before_the_abstain_block_load_as_before(tiny_bert_dir, tmp_path):
    """config.json with the old top-level abstain_below (a probability threshold) and no abstain block."""
    from test_router import save

    path, _ = save(tiny_bert_dir, tmp_path / "router")
    config = json.loads((path / "config.json").read_text())
    config.pop("abstain")
    config["abstain_below"] = 1.0
    (path / "config.json").write_text(json.dumps(config))
    gate = Router.from_pretrained(path, device="cpu")
    assert gate.abstain_score == "probability" and gate.abstain_below == 1.0 and gate.kb_index is None
    result = gate.route("anything")
    assert result.expert is None and result.kb_similarity is None
    with pytest.raises(RouterError, match="no kb_index"):
        gate.scores(["anything"], kb_similarity=True)


def test_save_router_checks_the_abstain_block(tiny_bert_dir, tmp_path):
    model, tokenizer = build_model(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    args = (model, tokenizer, LABELS, MAX_LENGTH, 0.05, {})
    with pytest.raises(ValueError, match="needs the kb_index"):
        save_router(tmp_path / "a", *args, abstain={"score": "kb_similarity", "threshold": 0.5, "top_k": 3})
    with pytest.raises(ValueError, match="abstain score 'margin'"):
        save_router(tmp_path / "b", *args, abstain={"score": "margin", "threshold": 0.5})
    with pytest.raises(ValueError, match="outside"):
        save_router(tmp_path / "c", *args, abstain_below=1.5)
    assert not any(tmp_path.iterdir())  # nothing half-written
