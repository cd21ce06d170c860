"""The DACT model: layer-by-layer encoder, the recursion, the loss, and the exact per-sample early exit.

Float policy of these tests: results computed on different batch shapes differ by rounding (~1e-7),
so probabilities are compared within 1e-5. An exit decision or an argmax can only flip where the
exit margin or the top-two gap is itself within 1e-5 of zero (a float tie); the tests allow exactly
that and nothing else, and check such ties stay rare.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
)

from moegate.models.dact import (
    HALTING_BIAS_INIT,
    DactRouterModel,
    HeadConfig,
    exit_condition,
    exit_margin,
)

VOCAB = 60
TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def tiny_encoder(arch: str = "bert", layers: int = 3, attn: str = "sdpa"):
    if arch == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
        cfg._attn_implementation = attn
        return BertModel(cfg)
    if arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=2, hidden_dim=64,
                               max_position_embeddings=64)
        cfg._attn_implementation = attn
        return DistilBertModel(cfg)
    if arch == "roberta":
        return RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=70))
    if arch == "electra":
        return ElectraModel(ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                          num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                          max_position_embeddings=64))
    raise ValueError(arch)


def randomize_heads(model: DactRouterModel, gen: torch.Generator, scale: float, halting_bias: float) -> None:
    """Random DACT units: weights ~ N(0, scale²/fan_in), halting output biases around ``halting_bias``."""
    with torch.no_grad():
        for module in [model.projection, *model.classifiers, *model.halting]:
            for p in module.parameters():
                fan_in = p.shape[1] if p.dim() == 2 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5)
        for g in model.halting:
            g.output.bias.copy_(halting_bias + torch.randn(1, generator=gen))


def batch(lengths: list[int], gen: torch.Generator, width: int | None = None):
    """Right-padded random token rows starting with [CLS]=2; pad id 0 (BERT's and DistilBERT's)."""
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
        ids[i, 0] = 2
        mask[i, :n] = 1
    return ids, mask


def make_model(arch="bert", layers=3, experts=3, seed=0, scale=3.0, halting_bias=0.0, head=None):
    torch.manual_seed(seed)
    model = DactRouterModel(tiny_encoder(arch, layers), experts, head or HeadConfig(projection_dim=16, width=16))
    randomize_heads(model, torch.Generator().manual_seed(seed), scale, halting_bias)
    return model.eval()


def margins(model: DactRouterModel, ids, mask) -> np.ndarray:
    """(B, N) exit margins a_n[c*]·(1−p_n)^d − a_n[c_ru] − d·p_n, written out here in float64 from the
    all-layer forward pass (independent of moegate.models.dact.exit_margin)."""
    with torch.no_grad():
        out = model(ids, mask)
    a, p = out.a.double().numpy(), out.p.double().numpy()
    n_layers = a.shape[0]
    top = -np.sort(-a, axis=-1)
    d = (n_layers - np.arange(1, n_layers + 1))[:, None]
    return (top[..., 0] * (1 - p) ** d - top[..., 1] - d * p).T


# -- the config and the encoder ---------------------------------------------------------------------
def test_head_config_takes_the_config_section():
    section = yaml.safe_load((REPO / "config.yaml").read_text())["router"]["head"]
    assert HeadConfig(**section).to_dict() == section
    with pytest.raises(ValueError, match="router.head.activation"):
        HeadConfig(activation="swish")
    with pytest.raises(ValueError, match="router.head.pooling"):
        HeadConfig(pooling="max")
    with pytest.raises(ValueError, match="router.head.depth"):
        HeadConfig(depth=-1)


@pytest.mark.parametrize("arch,attn", [("bert", "sdpa"), ("bert", "eager"), ("distilbert", "sdpa"),
                                       ("distilbert", "eager"), ("roberta", "sdpa"), ("electra", "sdpa")])
def test_layer_by_layer_run_equals_the_hf_forward(arch, attn):
    torch.manual_seed(0)
    encoder = tiny_encoder(arch, 2, attn).eval()
    gen = torch.Generator().manual_seed(1)
    ids, mask = batch([9, 4, 1, 7], gen)
    ids[mask == 0] = encoder.config.pad_token_id
    with torch.no_grad():
        ref = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        model = DactRouterModel(encoder, 2).eval()
        hidden = model._embed(ids)
        layer_mask = model._layer_mask(hidden, mask)
        for n in range(1, model.num_layers + 1):
            hidden = model._run_layer(n, hidden, layer_mask)
            real = mask.bool()  # padded positions' states are garbage in both and never read
            torch.testing.assert_close(hidden[real], ref[n][real], atol=1e-5, rtol=1e-5)


def test_unsupported_backbones_fail_clearly():
    gpt2 = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(TypeError, match="unsupported backbone GPT2Model"):
        DactRouterModel(gpt2, 3)
    wrapped = BertForSequenceClassification(tiny_encoder("bert", 2).config)
    with pytest.raises(TypeError, match=r"pass its base encoder \(model.bert\)"):
        DactRouterModel(wrapped, 3)


def test_left_padding_is_rejected_with_the_rows():
    model = make_model()
    ids, mask = batch([3, 4, 5], torch.Generator().manual_seed(0), width=5)
    mask = mask.flip(1)  # the full-length row stays valid
    with pytest.raises(ValueError, match=r"rows \[0, 1\].*right-padded"):
        model.early_exit(ids, mask)


# -- the recursion and the loss -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_forward_follows_the_dact_recursion(arch):
    model = make_model(arch, layers=3, experts=4, seed=3, halting_bias=1.0)
    ids, mask = batch([6, 2, 9], torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, mask)
    n_layers, rows, k = out.a.shape
    assert (n_layers, rows, k) == (3, 3, 4) and out.log_a.shape == (3, 4) and out.p.shape == (3, 3)
    y, h = out.y.double(), out.h.double()
    p_prev, a = torch.ones(rows, dtype=torch.float64), torch.zeros(rows, k, dtype=torch.float64)
    for n in range(n_layers):  # the plain formula of DESIGN, in float64
        a = y[n] * p_prev[:, None] + a * (1 - p_prev[:, None])
        p_prev = h[n] * p_prev
        torch.testing.assert_close(out.a[n].double(), a, atol=TOL, rtol=0)
        torch.testing.assert_close(out.p[n].double(), p_prev, atol=TOL, rtol=0)
    torch.testing.assert_close(out.log_a.exp(), out.a[-1])
    torch.testing.assert_close(out.a.sum(-1), torch.ones(n_layers, rows), atol=TOL, rtol=0)
    assert bool((out.p[1:] <= out.p[:-1]).all())


def test_fresh_halting_heads_start_at_the_documented_value():
    torch.manual_seed(0)
    model = DactRouterModel(tiny_encoder("bert", 3), 3, HeadConfig(projection_dim=16, width=16)).eval()
    ids, mask = batch([5, 3], torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model(ids, mask).h
    torch.testing.assert_close(h, torch.full_like(h, torch.sigmoid(torch.tensor(HALTING_BIAS_INIT)).item()))


@pytest.mark.parametrize("halting_bias", [18.0, 200.0])
def test_saturated_halting_keeps_log_a_and_gradients_finite(halting_bias):
    # 18: p = 1 − 1.5e-8, exp(log p) rounds to 1 in float32; 200: log p itself rounds to 0
    model = make_model()
    for g in model.halting:
        torch.nn.init.zeros_(g.output.weight)
        torch.nn.init.constant_(g.output.bias, halting_bias)
    ids, mask = batch([4, 6], torch.Generator().manual_seed(0))
    out = model.train()(ids, mask)
    total, _, _ = model.loss(out, torch.tensor([0, 1]), 0.1)
    total.backward()
    assert torch.isfinite(out.log_a).all()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


@pytest.mark.parametrize("head", [HeadConfig(projection_dim=16, width=16),
                                  HeadConfig(projection_dim=16, depth=2, width=8, batch_norm=True, activation="tanh"),
                                  HeadConfig(projection_dim=16, depth=0, activation="relu")])
def test_loss_is_nll_plus_lambda_ponder_and_gradients_reach_every_part(head):
    torch.manual_seed(0)
    model = DactRouterModel(tiny_encoder("bert", 3), 3, head).train()
    ids, mask = batch([5, 8, 3, 6], torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 2])
    out = model(ids, mask)
    total, nll, ponder = model.loss(out, labels, 0.5)
    torch.testing.assert_close(nll, -out.log_a[torch.arange(4), labels].mean())
    torch.testing.assert_close(ponder, out.p.sum(0).mean())
    torch.testing.assert_close(total, nll + 0.5 * ponder)
    total.backward()
    parts = {
        "embeddings": model.encoder.embeddings.word_embeddings.weight,
        "projection": model.projection[0].weight,
        **{f"layer{n}": layer.attention.self.query.weight for n, layer in enumerate(model.encoder.encoder.layer, 1)},
        **{f"classifier{n}": c.output.weight for n, c in enumerate(model.classifiers, 1)},
        **{f"halting{n}": g.output.weight for n, g in enumerate(model.halting, 1)},
    }
    for name, param in parts.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_layer_loss_adds_the_mean_nll_of_every_layers_classifier():
    torch.manual_seed(0)
    model = DactRouterModel(tiny_encoder("bert", 3), 3, HeadConfig(projection_dim=16, width=16)).train()
    ids, mask = batch([5, 8, 3], torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 1])
    out = model(ids, mask)
    plain, nll, ponder = model.loss(out, labels, 0.2)
    total, nll2, ponder2 = model.loss(out, labels, 0.2, layer_loss_weight=0.7)
    torch.testing.assert_close((nll2, ponder2), (nll, ponder))  # the reported terms stay DACT's
    per_layer = torch.stack([-out.y[n, torch.arange(3), labels].log().mean() for n in range(out.y.shape[0])])
    torch.testing.assert_close(total, plain + 0.7 * per_layer.mean())
    # with h ≈ 1 everywhere a_N = y_N: layer 1's classifier then learns only from its own exit term
    for g in model.halting:
        torch.nn.init.zeros_(g.output.weight)
        torch.nn.init.constant_(g.output.bias, 30.0)
    grads = []
    for weight in (0.0, 1.0):
        model.zero_grad()
        model.loss(model(ids, mask), labels, 0.0, layer_loss_weight=weight)[0].backward()
        grads.append(model.classifiers[0].output.weight.grad.abs().sum().item())
    assert grads[0] < 1e-8 and grads[1] > 1e-4


# -- the exit rule --------------------------------------------------------------------------------------
def test_exit_rule_by_hand():
    log_a = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]).log()
    log_p = torch.tensor([0.01, 0.3, 0.0001]).log()
    # 0.7·0.99² = 0.686 ≥ 0.2 + 0.02;  0.7·0.7² = 0.343 < 0.2 + 0.6;  a tie never passes with p > 0
    assert exit_condition(log_a, log_p, 2).tolist() == [True, False, False]
    torch.testing.assert_close(exit_margin(log_a, log_p, 2)[:2], torch.tensor([0.7 * 0.99**2 - 0.22, 0.343 - 0.8]))
    assert exit_condition(log_a, log_p, 0).all()  # last layer: everyone exits
    one_expert = torch.zeros(2, 1)
    assert exit_condition(one_expert, torch.tensor([0.5, 0.9]).log(), 3).all()


# -- the exit rule at its bound: built so that any weaker (or stronger) rule fails ----------------------
# Random models rarely put a row near the bound (a rule weakened to d − 1 layers left, or without the ^d,
# failed 1-2 of 30 random seeds). These rows sit on it: a_n and p_n chosen so the bound's margin
# a_n[c*]·(1 − p_n)^d − a_n[c_ru] − d·p_n is 0, or ±MARGIN_STEP, for d = 1..5 layers left.
MARGIN_STEP = 1e-5  # 100× the float32 rounding of the margin (~1e-7), far below what any change of the rule moves
N_BOUND = 6  # layers of the built rows: the row decides at layer n = N − d


def _distribution(leader: float, runner_up: float) -> list[float]:
    """[leader, runner_up, rest...]: the rest split evenly into classes no larger than the runner-up."""
    rest = 1.0 - leader - runner_up
    if rest <= 1e-12:
        return [leader, runner_up]
    m = max(1, int(np.ceil(rest / runner_up - 1e-9)))
    return [leader, runner_up] + [rest / m] * m


def bound_rows() -> list[dict]:
    """Rows (a_n, p, d, offset) whose exact margin is offset · MARGIN_STEP, offset in (−1, 0, 1)."""
    rows = []
    for d in range(1, N_BOUND):
        for p in (1e-3, 0.01, 0.05, 0.1, 0.2, 0.3):
            for runner_up in (0.01, 0.05, 0.1, 0.2, 0.3, 0.4):
                at_bound = (runner_up + d * p) / (1 - p) ** d  # the leader that makes the margin exactly 0
                shift = MARGIN_STEP / (1 - p) ** d
                if not runner_up + 2 * shift <= at_bound <= 1 - runner_up - 2 * shift:
                    continue  # no valid distribution has this leader
                for offset in (-1, 0, 1):
                    rows.append({"a": _distribution(at_bound + offset * shift, runner_up), "p": p, "d": d,
                                 "offset": offset})
    return rows


def worst_case_rows() -> list[dict]:
    """Rows that fail the bound, yet a rule weakened to d − 1 layers left, or without the ^d, would let
    exit: with the worst continuation (every later layer all for the runner-up, never halting further)
    their full-depth answer is the runner-up, a_N = (L·q, R·q + 1 − q, ...), q = (1 − p)^d."""
    rows = []
    for d in range(1, N_BOUND):
        for p in (0.05, 0.1, 0.2, 0.3, 0.5):
            for runner_up in (0.02, 0.05, 0.1, 0.2, 0.3, 0.45):
                for leader in np.linspace(runner_up, 1 - runner_up, 12)[1:]:
                    q = (1 - p) ** d
                    flips_by = runner_up * q + 1 - q - leader * q
                    weaker_exits = (leader * (1 - p) ** (d - 1) >= runner_up + (d - 1) * p
                                    or leader * (1 - p) >= runner_up + d * p)
                    if flips_by > 1e-3 and leader - runner_up > 1e-3 and weaker_exits:
                        rows.append({"a": _distribution(float(leader), runner_up), "p": p, "d": d, "offset": -1})
    return rows


def bound_units(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log y (N, B, K), log h (N, B)) whose DACT recursion reaches each row's a_n and p at layer n = N − d,
    then follows the worst continuation. Layers before n never halt (h = 1: p stays 1, a_k = y_k)."""
    width = max(len(r["a"]) for r in rows)
    target = torch.tensor([r["a"] + [0.0] * (width - len(r["a"])) for r in rows], dtype=torch.float64)
    runner_up = torch.zeros_like(target)
    runner_up[:, 1] = 1.0
    log_y = torch.empty(N_BOUND, len(rows), width, dtype=torch.float64)
    log_h = torch.zeros(N_BOUND, len(rows), dtype=torch.float64)
    for i, r in enumerate(rows):
        n = N_BOUND - r["d"]
        log_y[:n, i] = target[i].clamp_min(1e-30).log()
        log_y[n:, i] = runner_up[i].clamp_min(1e-30).log()
        log_h[n - 1, i] = np.log(r["p"])
    return log_y.float(), log_h.float()


def bound_output(rows: list[dict]):
    """The all-layer DactOutput of :func:`bound_units`, through the recursion moegate.models.dact runs."""
    from moegate.models.dact import DactOutput, dact_step

    log_y, log_h = bound_units(rows)
    state, log_as, log_ps = None, [], []
    for n in range(N_BOUND):
        state = dact_step(log_y[n], log_h[n], state)
        log_as.append(state[0])
        log_ps.append(state[1])
    log_a = torch.stack(log_as)
    return DactOutput(log_a=log_a[-1], a=log_a.exp(), log_y=log_y, h=log_h.exp(), p=torch.stack(log_ps).exp())


def test_exit_margin_is_the_bound_itself_at_the_bound():
    rows = bound_rows()
    assert len(rows) >= 300 and {r["d"] for r in rows} == {1, 2, 3, 4, 5}
    for d in range(1, N_BOUND):
        group = [r for r in rows if r["d"] == d]
        width = max(len(r["a"]) for r in group)
        log_a = torch.tensor([r["a"] + [0.0] * (width - len(r["a"])) for r in group]).clamp_min(1e-30).log()
        log_p = torch.tensor([r["p"] for r in group]).log()
        offset = torch.tensor([r["offset"] for r in group])
        margin = exit_margin(log_a, log_p, d)
        # the margin is the bound's, to float32 rounding: a rule with d − 1, without ^d, or any other change
        # of the formula is off by far more than 2e-6 here
        torch.testing.assert_close(margin, offset * MARGIN_STEP, atol=2e-6, rtol=0,
                                   msg=lambda m, d=d: f"d={d}: exit_margin is not the DACT bound at the bound. {m}")
        halt = exit_condition(log_a, log_p, d)
        assert halt[offset == 1].all() and not halt[offset == -1].any(), f"d={d}"


def test_early_exit_is_exact_at_the_bound_and_against_the_worst_continuation():
    """Rows just over the bound leave at layer n and keep their answer though every later layer pushes the
    runner-up; rows just under it (and the rows a weaker rule would let go) stay; every answer is the
    full-depth answer. Checked on the all-layer output (cached states) and in the real layer-by-layer run."""
    from moegate.models.dact import exit_from_output

    near, worst = [r for r in bound_rows() if r["offset"] != 0], worst_case_rows()
    rows = near + worst
    assert len(worst) >= 200, len(worst)
    out = bound_output(rows)
    full = out.a[-1].argmax(-1)
    n = torch.tensor([N_BOUND - r["d"] for r in rows])
    over = torch.tensor([r["offset"] == 1 for r in rows])
    assert (full[len(near):] == 1).all(), "the worst continuation must flip the worst-case rows"

    probs, layer = exit_from_output(out)
    assert (probs.argmax(-1) == full).all(), f"early answer differs on rows {(probs.argmax(-1) != full).nonzero()}"
    assert (layer[over] == n[over]).all() and (layer[~over] > n[~over]).all()

    # the same rows through DactRouterModel.early_exit: each row's units are looked up from its pooled state
    model = make_model("bert", layers=N_BOUND, experts=out.a.shape[-1], head=HeadConfig(projection_dim=16,
                                                                                         width=16, pooling="mean"))
    gen = torch.Generator().manual_seed(0)
    ids, mask = batch([8] * len(rows), gen)
    with torch.no_grad():
        table = model.states(ids, mask).float()
    assert min(float(torch.pdist(table[k]).min()) for k in range(N_BOUND)) > 1e-3, "rows must be told apart"
    log_y, log_h = bound_units(rows)

    def unit(k, pooled, log_y_given=None):
        row = torch.cdist(pooled.float(), table[k - 1]).argmin(1)
        return log_y[k - 1, row], log_h[k - 1, row]

    model._unit = unit
    probs, layer = model.early_exit(ids, mask)
    assert (probs.argmax(-1) == full).all(), f"early answer differs on rows {(probs.argmax(-1) != full).nonzero()}"
    assert (layer[over] == n[over]).all() and (layer[~over] > n[~over]).all()


# -- early exit: exactness, batch independence, real savings -------------------------------------------
@st.composite
def cases(draw):
    return {
        "arch": draw(st.sampled_from(["bert", "distilbert"])),
        "pooling": draw(st.sampled_from(["cls", "mean"])),
        "layers": draw(st.sampled_from([1, 2, 3, 4, 6])),
        "experts": draw(st.integers(2, 5)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "scale": draw(st.floats(0.5, 8.0)),
        "halting_bias": draw(st.floats(-9.0, 4.0)),
        "lengths": draw(st.lists(st.integers(1, 12), min_size=1, max_size=6)),
        "companions": draw(st.lists(st.integers(1, 20), min_size=1, max_size=4)),
    }


def seeded_case(seed: int) -> dict:
    """A case drawn uniformly (hypothesis favours simple values; this sweep covers the space evenly)."""
    rng = np.random.default_rng(seed)
    return {
        "arch": str(rng.choice(["bert", "distilbert"])),
        "pooling": str(rng.choice(["cls", "mean"])),
        "layers": int(rng.choice([2, 3, 4, 6])),
        "experts": int(rng.integers(2, 6)),
        "seed": seed,
        "scale": float(rng.uniform(0.5, 8.0)),
        "halting_bias": float(rng.uniform(-7.0, 4.0)),
        "lengths": rng.integers(1, 13, size=int(rng.integers(2, 9))).tolist(),
        "companions": rng.integers(1, 21, size=int(rng.integers(1, 5))).tolist(),
    }


def check_case(case: dict) -> dict:
    """Assert properties (1)-(4) for one random model and batch; return counts for coverage checks."""
    model = make_model(case["arch"], case["layers"], case["experts"], case["seed"], case["scale"],
                       case["halting_bias"], head=HeadConfig(projection_dim=16, width=16, pooling=case["pooling"]))
    gen = torch.Generator().manual_seed(case["seed"])
    ids, mask = batch(case["lengths"], gen)
    rows, n_layers = len(case["lengths"]), model.num_layers
    with torch.no_grad():
        out = model(ids, mask)
    probs, layer = model.early_exit(ids, mask)
    full, full_layer = model.full_depth(ids, mask)
    margin = margins(model, ids, mask)
    counts = {"rows": rows, "early": int((layer < n_layers).sum()), "ties": 0, "layers": set(layer.tolist())}
    assert full_layer.tolist() == [n_layers] * rows
    torch.testing.assert_close(full, out.a[-1], atol=TOL, rtol=0)

    # (4) every a_n is a distribution
    torch.testing.assert_close(out.a.sum(-1), torch.ones_like(out.p), atol=TOL, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(rows), atol=TOL, rtol=0)
    assert ((layer >= 1) & (layer <= n_layers)).all()

    for i in range(rows):
        n = int(layer[i])
        # the early answer is a_n of this row at its exit layer
        torch.testing.assert_close(probs[i], out.a[n - 1, i], atol=TOL, rtol=0)
        # (3) the bound held at the exit layer, and failed at every earlier one
        assert margin[i, n - 1] >= -TOL, f"row {i} exited at {n} with margin {margin[i, n - 1]}: {case}"
        assert (margin[i, : n - 1] < TOL).all(), f"row {i} passed the rule before layer {n}: {margin[i]}: {case}"
        # (1) early-exit argmax == full-depth argmax, unless full depth has a float tie at the top
        top2 = full[i].topk(2).values
        if top2[0] - top2[1] > TOL:
            assert int(probs[i].argmax()) == int(full[i].argmax()), f"row {i}: {case}"
        else:
            counts["ties"] += 1

    # (2) a row's result does not depend on its batch: alone, and among other and longer rows
    others, others_mask = batch(case["companions"], gen, width=max(case["companions"] + case["lengths"]) + 3)
    for i, length in enumerate(case["lengths"]):
        alone = model.early_exit(ids[i : i + 1, :length], mask[i : i + 1, :length])
        mixed_ids = torch.cat([others[:1], _pad(ids[i : i + 1], others.shape[1]), others[1:]])
        mixed_mask = torch.cat([others_mask[:1], _pad(mask[i : i + 1], others.shape[1]), others_mask[1:]])
        mixed = model.early_exit(mixed_ids, mixed_mask)
        for p, e in [(alone[0][0], alone[1][0]), (mixed[0][1], mixed[1][1])]:
            if int(e) == int(layer[i]):
                torch.testing.assert_close(p, probs[i], atol=TOL, rtol=0)
            else:  # only a float tie of the exit margin at the earlier of the two layers may flip it
                counts["ties"] += 1
                assert abs(margin[i, min(int(e), int(layer[i])) - 1]) < TOL, f"row {i}: {case}"
    return counts


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_early_exit_is_exact_and_independent_of_the_batch(case):
    check_case(case)


def test_early_exit_properties_over_many_seeds():
    totals = {"rows": 0, "early": 0, "ties": 0}
    exit_layers: set[int] = set()
    for seed in range(30):
        counts = check_case(seeded_case(seed))
        exit_layers |= counts.pop("layers")
        for key in totals:
            totals[key] += counts[key]
    # the sweep must exercise early exits at several depths, or the checks above prove little
    assert totals["early"] >= totals["rows"] // 5 and len(exit_layers) >= 4, (totals, exit_layers)
    assert totals["ties"] <= max(1, totals["rows"] // 50), totals  # float ties are rare events


def test_halted_rows_really_leave_the_batch():
    model = make_model(layers=4, experts=3, seed=5, scale=6.0, halting_bias=-4.0)
    gen = torch.Generator().manual_seed(5)
    ids, mask = batch([3, 9, 5, 12, 7, 4, 10, 6, 8, 11, 2, 5], gen)
    seen: dict[int, list[int]] = {n: [] for n in range(1, 5)}
    hooks = [layer.register_forward_hook(lambda m, args, out, n=n: seen[n].append(args[0].shape[0]))
             for n, layer in enumerate(model.encoder.encoder.layer, 1)]
    try:
        _, layer = model.early_exit(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    counts = np.bincount(layer.numpy(), minlength=5)
    active = [len(ids) - counts[1:n].sum() for n in range(1, 5)]  # rows that entered layer n
    assert [sum(seen[n]) for n in range(1, 5)] == active
    assert counts[1:4].sum() > 0 and active[-1] < len(ids), f"nothing exited early: {counts}"


def test_all_rows_exit_at_layer_one_when_halting_and_confident():
    model = make_model(layers=3, seed=1, scale=0.1, halting_bias=-30.0)
    with torch.no_grad():
        model.classifiers[0].output.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    ids, mask = batch([4, 7, 2], torch.Generator().manual_seed(1))
    probs, layer = model.early_exit(ids, mask)
    assert layer.tolist() == [1, 1, 1] and probs.argmax(1).tolist() == [0, 0, 0]


def test_never_halting_runs_full_depth():
    model = make_model(layers=3, seed=2, halting_bias=30.0)
    for g in model.halting:  # h = sigmoid(≈30) for every input: p ≈ 1, the bound cannot hold early
        torch.nn.init.zeros_(g.output.weight)
    ids, mask = batch([4, 7, 2], torch.Generator().manual_seed(2))
    probs, layer = model.early_exit(ids, mask)
    full, _ = model.full_depth(ids, mask)
    assert layer.tolist() == [3, 3, 3]
    torch.testing.assert_close(probs, full, atol=TOL, rtol=0)


def test_trailing_padding_and_empty_batches_change_nothing():
    model = make_model(seed=4, halting_bias=-3.0)
    ids, mask = batch([4, 6], torch.Generator().manual_seed(4))
    probs, layer = model.early_exit(ids, mask)
    wide_probs, wide_layer = model.early_exit(_pad(ids, 40), _pad(mask, 40))
    torch.testing.assert_close(wide_probs, probs, atol=TOL, rtol=0)
    assert wide_layer.tolist() == layer.tolist()
    empty_probs, empty_layer = model.early_exit(ids[:0], mask[:0])
    assert empty_probs.shape == (0, 3) and empty_layer.shape == (0,)


def test_inference_runs_in_eval_mode_and_restores_training():
    head = HeadConfig(projection_dim=16, depth=1, width=8, batch_norm=True, dropout=0.5)
    model = make_model(seed=6, head=head).train()
    ids, mask = batch([5], torch.Generator().manual_seed(6))  # one row: BatchNorm must use running stats
    first = model.early_exit(ids, mask)
    again = model.early_exit(ids, mask)  # dropout would make these differ
    torch.testing.assert_close(first[0], again[0])
    assert model.training


# -- prototype units, cached states, the exit read off an all-layer output ---------------------------
def prototype_model(arch="bert", layers=3, experts=3, seed=0, halting_bias=0.0, per_expert=4):
    torch.manual_seed(seed)
    head = HeadConfig(classifier="prototypes", prototypes=per_expert, prototype_top_k=2, width=16, pooling="mean")
    model = DactRouterModel(tiny_encoder(arch, layers), experts, head)
    gen = torch.Generator().manual_seed(seed)
    ids, mask = batch([int(x) for x in torch.randint(2, 12, (30,), generator=gen)], gen)
    labels = torch.arange(30) % experts
    with torch.no_grad():
        model.init_prototypes(model.states(ids, mask), labels, seed=seed)
        for g in model.halting:  # random halting so rows exit at every layer
            g.output.weight.copy_(torch.randn(g.output.weight.shape, generator=gen))
            g.output.bias.fill_(halting_bias)
    return model.eval()


def test_prototype_init_centres_each_layer_and_uses_kmeans_centroids():
    model = prototype_model(per_expert=4)
    for n, head in enumerate(model.classifiers):
        assert head.prototypes.shape == (3 * 4, 32)
        torch.testing.assert_close(head.prototypes.norm(dim=1), torch.ones(12))
        assert model.center[n].abs().sum() > 0  # set from the states
    with pytest.raises(ValueError, match="prototype_top_k"):
        HeadConfig(classifier="prototypes", prototypes=2, prototype_top_k=3)
    with pytest.raises(ValueError, match="router.head.classifier"):
        HeadConfig(classifier="knn")


@pytest.mark.parametrize("seed", range(8))
def test_prototype_units_keep_early_exit_equal_to_full_depth(seed):
    model = prototype_model(arch="bert" if seed % 2 else "distilbert", seed=seed, halting_bias=float(seed - 4))
    gen = torch.Generator().manual_seed(100 + seed)
    ids, mask = batch([int(x) for x in torch.randint(2, 12, (16,), generator=gen)], gen)
    probs, _ = model.early_exit(ids, mask)
    full, _ = model.full_depth(ids, mask)
    top2 = full.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > TOL
    assert (probs.argmax(-1)[clear] == full.argmax(-1)[clear]).all()


@pytest.mark.parametrize("classifier", ["mlp", "prototypes"])
def test_cached_states_give_the_same_output_and_exits_as_tokens(classifier):
    from moegate.models.dact import exit_from_output

    if classifier == "prototypes":
        model = prototype_model(seed=3, halting_bias=-1.0)
    else:
        model = make_model(seed=3, halting_bias=-1.0, head=HeadConfig(projection_dim=16, width=16, pooling="mean"))
    gen = torch.Generator().manual_seed(7)
    ids, mask = batch([3, 9, 5, 11, 2, 7], gen)
    with torch.no_grad():
        from_tokens = model(ids, mask)
        from_states = model.forward_states(model.states(ids, mask))
    torch.testing.assert_close(from_states.a, from_tokens.a)
    probs, layer = model.early_exit(ids, mask)
    sim_probs, sim_layer = exit_from_output(from_states)
    assert sim_layer.tolist() == layer.tolist()
    torch.testing.assert_close(sim_probs, probs, atol=TOL, rtol=0)


def test_teacher_term_is_the_kl_to_the_answer_and_every_exit():
    model = prototype_model(seed=1)
    gen = torch.Generator().manual_seed(2)
    ids, mask = batch([4, 6, 8, 5], gen)
    labels = torch.tensor([0, 1, 2, 0])
    teacher = torch.softmax(torch.randn(4, 3, generator=gen), -1)
    out = model(ids, mask)
    base, _, _ = model.loss(out, labels, 0.1, layer_loss_weight=0.5)
    total, _, _ = model.loss(out, labels, 0.1, layer_loss_weight=0.5, teacher=teacher, teacher_weight=2.0)

    def kl(log_q):
        return (teacher * (teacher.log() - log_q)).sum(-1).mean()

    expected = kl(out.log_a) + 0.5 * torch.stack([kl(out.log_y[n]) for n in range(3)]).mean()
    torch.testing.assert_close(total - base, 2.0 * expected)


def test_label_weight_zero_learns_from_the_teacher_and_the_ponder_cost_alone():
    model = prototype_model(seed=1)
    gen = torch.Generator().manual_seed(3)
    ids, mask = batch([4, 6, 8, 5], gen)
    labels = torch.tensor([0, 1, 2, 0])
    teacher = torch.softmax(torch.randn(4, 3, generator=gen), -1)
    out = model(ids, mask)
    labels_only, nll, ponder = model.loss(out, labels, 0.1, layer_loss_weight=0.5)
    teacher_only, nll0, _ = model.loss(out, labels, 0.1, layer_loss_weight=0.5, teacher=teacher,
                                       teacher_weight=2.0, label_weight=0.0)
    both, _, _ = model.loss(out, labels, 0.1, layer_loss_weight=0.5, teacher=teacher, teacher_weight=2.0)
    torch.testing.assert_close(nll0, nll)  # still reported: early stopping watches it
    torch.testing.assert_close(both - teacher_only, labels_only - 0.1 * ponder)
    half, _, _ = model.loss(out, labels, 0.1, layer_loss_weight=0.5, label_weight=0.5)
    torch.testing.assert_close(half, 0.5 * (labels_only - 0.1 * ponder) + 0.1 * ponder)


# -- router.head.last_layer: kb (the last unit in the KB index's own geometry) ------------------------
def kb_last_model(seed=0, experts=3, per_expert=4, chunks=40, kb_scale=100.0):
    """A prototype model whose last layer is set from random "KB chunk" vectors; returns (model, vectors, experts)."""
    torch.manual_seed(seed)
    head = HeadConfig(classifier="prototypes", prototypes=per_expert, prototype_top_k=2, width=16, pooling="mean",
                      last_layer="kb", kb_scale=kb_scale)
    model = DactRouterModel(tiny_encoder("bert", 3), experts, head)
    gen = torch.Generator().manual_seed(seed)
    ids, mask = batch([int(x) for x in torch.randint(2, 12, (30,), generator=gen)], gen)
    with torch.no_grad():
        model.init_prototypes(model.states(ids, mask), torch.arange(30) % experts, seed=seed)
    vectors = torch.randn(chunks, model.hidden_size, generator=gen)
    kb_experts = torch.arange(chunks) % experts
    model.init_kb_prototypes(vectors, kb_experts, seed=seed)
    return model.eval(), vectors, kb_experts


def test_kb_last_layer_needs_prototype_units():
    with pytest.raises(ValueError, match="last_layer: kb needs router.head.classifier"):
        HeadConfig(classifier="mlp", last_layer="kb")
    with pytest.raises(ValueError, match="router.head.last_layer"):
        HeadConfig(classifier="prototypes", last_layer="frozen")
    with pytest.raises(ValueError, match="last_layer is not 'kb'"):
        prototype_model().init_kb_prototypes(torch.randn(6, 32), torch.arange(6) % 3)


def test_kb_last_layer_scores_the_raw_cosine_to_kmeans_centroids_of_each_experts_chunks():
    from sklearn.cluster import KMeans

    model, vectors, kb_experts = kb_last_model(seed=4)
    head = model.classifiers[-1]
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    for e in range(3):  # each expert's prototypes: k-means of its own chunks (same seed), unit length
        expected = KMeans(n_clusters=4, n_init=1, random_state=4, max_iter=100).fit(unit[kb_experts == e].numpy())
        torch.testing.assert_close(head.prototypes[e * 4:(e + 1) * 4],
                                   torch.nn.functional.normalize(torch.from_numpy(expected.cluster_centers_).float(),
                                                                 dim=-1))
    assert model.center[-1].abs().sum() == 0 and model.center[0].abs().sum() > 0
    states = torch.randn(3, 5, model.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.forward_states(states)
        # no projection, no centring: the scale times the mean of the top-2 cosines of the raw pooled state
        cos = torch.nn.functional.normalize(states[-1], dim=-1) @ head.prototypes.T
        logits = head.log_scale.exp() * cos.view(5, 3, 4).topk(2, dim=-1).values.mean(-1)
    torch.testing.assert_close(out.log_y[-1], torch.log_softmax(logits, -1))


def test_training_leaves_the_kb_prototypes_as_they_are_and_the_exit_stays_exact():
    from moegate.training import parameter_groups

    model, _, _ = kb_last_model(seed=2)
    before = model.classifiers[-1].prototypes.detach().clone()
    earlier = model.classifiers[0].prototypes.detach().clone()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01, 0.1), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    ids, mask = batch([4, 7, 9, 3, 6, 5], gen)
    model.train()
    for _ in range(3):
        total, _, _ = model.loss(model(ids, mask), torch.tensor([0, 1, 2, 0, 1, 2]), 0.01, layer_loss_weight=1.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    torch.testing.assert_close(model.classifiers[-1].prototypes, before, rtol=0, atol=0)
    assert not torch.equal(model.classifiers[0].prototypes, earlier)  # the other layers do train
    assert model.classifiers[-1].log_scale.item() == pytest.approx(math.log(100.0))  # router.head.kb_scale, fixed
    probs, _ = model.early_exit(ids, mask)
    full, _ = model.full_depth(ids, mask)
    assert probs.argmax(-1).tolist() == full.argmax(-1).tolist()


def test_kb_scale_null_leaves_the_kb_layers_scale_to_training():
    from moegate.training import parameter_groups

    with pytest.raises(ValueError, match="kb_scale"):
        HeadConfig(classifier="prototypes", last_layer="kb", kb_scale=0)
    model, _, _ = kb_last_model(seed=2, kb_scale=None)
    scale = model.classifiers[-1].log_scale.detach().clone()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01, 0.1), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    ids, mask = batch([4, 7, 9, 3, 6, 5], gen)
    model.train()
    total, _, _ = model.loss(model(ids, mask), torch.tensor([0, 1, 2, 0, 1, 2]), 0.01, layer_loss_weight=1.0)
    total.backward()
    optimizer.step()
    assert not torch.equal(model.classifiers[-1].log_scale.detach(), scale)
