"""The DACT router model: a Hugging Face encoder run layer by layer with a DACT unit after every layer.

Everything the forward pass needs is in this file (the transformers habit). The math, for layers
n = 1..N on c_n, layer n's [CLS] state (position 0), or with ``HeadConfig.pooling = "mean"`` the
mean of the row's token states after layer n:

    u_n = dropout(act(W c_n))             W: one projection shared by all layers
    y_n = softmax(f_n(u_n))               f_n: layer n's classifier head, K experts
    h_n = sigmoid(g_n(u_n))               g_n: layer n's halting head
    p_0 = 1, a_0 = 0
    p_n = h_n · p_{n-1}
    a_n = y_n · p_{n-1} + a_{n-1} · (1 − p_{n-1})

Training runs all N layers and minimises NLL(log a_N) + λ · mean_batch(Σ_n p_n) (λ, the ponder cost:
``router.ponder_cost``), optionally plus β · mean_n NLL(log y_n) (``layer_loss_weight``: every layer's
own classifier trained for its exit, as in DeeBERT/PABEE; without it the early heads learn only through
a_N). Inference halts sample i after layer n (d = N − n layers left, c* the top class of a_n, c_ru the
runner-up) when

    a_n[c*] · (1 − p_n)^d ≥ a_n[c_ru] + d · p_n

Because p only shrinks, the remaining layers can add at most d·p_n to any class and can scale the
leader down by at most (1 − p_n)^d, so the top class of a_N is c*: the early answer is the
full-depth answer, per sample. Halted rows leave the batch before the next layer runs.

Design choices (see also the module constants):
- W is shared across layers, as DESIGN says: it maps every depth's [CLS] into one gate space and
  costs hidden×projection_dim once (768×256 on DistilBERT) instead of N times. The classifier and
  halting heads are per layer, because [CLS] means different things at different depths and the
  halting decision after layer 1 needs a different calibration than after layer 5.
- The recursion runs in log space in float32 (even under autocast): log a_n via logaddexp, and
  log(1 − p) via expm1, so a_N never underflows to log(0) and p ≈ 1 keeps an exact 1 − p.
- Trailing padding columns that no row attends to are cut off before the layers run (and again
  each time rows leave the batch), so a short question padded to max_length costs what it is.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moegate.config import defaults as config_defaults

log = logging.getLogger(__name__)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
POOLINGS = ("cls", "mean")
CLASSIFIERS = ("mlp", "prototypes")
# the last unit: trained like the others, or kb = the KB index's own geometry (fixed k-means prototypes of
# every KB chunk's embedding, read without projection or centring): retrieval routing's space, whose
# nearest-prototype score beat retrieval routing and every trained head on the OpenStax dev questions
# (0.840 untrained vs 0.827 retrieval, 0.76-0.83 trained on the synthetic questions)
LAST_LAYERS = ("trained", "kb")
PROTOTYPE_SCALE_INIT = 20.0  # logit = scale × cosine: a cosine gap of 0.05 starts as e^1 odds

# Halting heads start with h_n = sigmoid(1.0) ≈ 0.73 for every input (zero output weights). Then
# p_n = 0.73^n spreads a_N's weight over layers 2..N (≈ 0.04 / 0.12 / 0.18 / 0.22 / 0.23 / 0.21 on
# 6 layers), so every layer's classifier gets gradient and nothing halts at layer 1 before the heads
# have learned anything. A bias ≤ 0 would put ~30 % of the weight on layer 1 from the start; a large
# one (h ≈ 1) would starve the early classifiers of gradient.
HALTING_BIAS_INIT = 1.0

# log p is clamped just below 0 before log(1 − p): keeps log(1 − p) finite (≥ −69) when the halting
# head saturates, which would otherwise give −inf and NaN gradients.
_LOG_P_MAX = -1e-30

EXIT_RULE = {
    "name": "dact_bound",
    "formula": "a_n[c*] * (1 - p_n)^d >= a_n[c_ru] + d * p_n, d = N - n",
    "description": "halt sample after layer n when the top class of a_n cannot change in the d layers left",
}
EXIT_RULES = {EXIT_RULE["name"]: EXIT_RULE}  # the rules exit_condition implements, by the name config.json records

# model_type -> how to reach (embeddings, layer list); all of these use the bidirectional mask helper
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
_SUPPORTED = _BERT_LIKE + ("distilbert",)

_HEAD = config_defaults("router.head")


@dataclass
class HeadConfig:
    """The DACT unit's shape; the keys are config ``router.head`` (``HeadConfig(**section)``)."""

    # defaults: the schema's router.head (config.defaults), so a bare HeadConfig() is the config's default
    projection_dim: int = _HEAD["projection_dim"]  # u_n = act(W c_n): a small shared gate space
    depth: int = _HEAD["depth"]  # hidden layers in each classifier / halting head; 0 = one linear map
    width: int = _HEAD["width"]  # units per hidden layer
    dropout: float = _HEAD["dropout"]  # on u_n and after every hidden layer (training only)
    batch_norm: bool = _HEAD["batch_norm"]  # BatchNorm1d after hidden layers; needs training batches of ≥ 2
    activation: str = _HEAD["activation"]  # relu | gelu | tanh, for the projection and the hidden layers
    pooling: str = _HEAD["pooling"]  # what each unit reads: cls = c_n at position 0; mean = the masked token
    # mean (sentence-transformers backbones such as MiniLM were trained for mean pooling)
    classifier: str = _HEAD["classifier"]  # mlp = an MLP per layer on u_n; prototypes = cosine to prototypes
    prototypes: int = _HEAD["prototypes"]  # per expert and layer (classifier = prototypes): a course is many topics
    prototype_top_k: int = _HEAD["prototype_top_k"]  # an expert's score: mean of its top-k prototype cosines
    last_layer: str = _HEAD["last_layer"]  # trained | kb: the last unit keeps the encoder's geometry (see _unit)
    kb_scale: float | None = _HEAD["kb_scale"]  # kb: its fixed logit scale (× mean top-k cosine); None = learned

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"router.head.pooling: expected one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"router.head.classifier: expected one of {list(CLASSIFIERS)}, got {self.classifier!r}")
        for key in ("prototypes", "prototype_top_k"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"router.head.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if int(self.prototype_top_k) > int(self.prototypes):
            raise ValueError(f"router.head.prototype_top_k ({self.prototype_top_k}) exceeds router.head.prototypes "
                             f"({self.prototypes})")
        if self.last_layer not in LAST_LAYERS:
            raise ValueError(f"router.head.last_layer: expected one of {list(LAST_LAYERS)}, got {self.last_layer!r}")
        if self.last_layer == "kb" and self.classifier != "prototypes":
            raise ValueError("router.head.last_layer: kb needs router.head.classifier: prototypes")
        if self.kb_scale is not None and not float(self.kb_scale) > 0:
            raise ValueError(f"router.head.kb_scale: expected a positive number or null, got {self.kb_scale!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"router.head.activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for key in ("projection_dim", "width"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"router.head.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if int(self.depth) < 0:
            raise ValueError(f"router.head.depth: expected an integer ≥ 0, got {self.depth!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"router.head.dropout: expected a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DactOutput:
    """All-layer outputs of one batch (N layers, B rows, K experts)."""

    log_a: torch.Tensor  # (B, K) log a_N: the training target's log-probabilities
    a: torch.Tensor  # (N, B, K) a_n: the accumulated answer after each layer (rows sum to 1)
    log_y: torch.Tensor  # (N, B, K) log y_n: each layer's own classifier, log-probabilities
    h: torch.Tensor  # (N, B) h_n: halting values
    p: torch.Tensor  # (N, B) p_n = Π h: probability mass still "running" after layer n

    @property
    def y(self) -> torch.Tensor:
        """(N, B, K) y_n: each layer's own classifier distribution."""
        return self.log_y.exp()


class _Head(nn.Sequential):
    """``depth`` × (Linear → [BatchNorm1d] → act → Dropout), then Linear to ``out``."""

    def __init__(self, in_dim: int, out: int, cfg: HeadConfig):
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(int(cfg.depth)):
            layers.append(nn.Linear(dim, cfg.width))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm1d(cfg.width))
            layers += [ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)]
            dim = cfg.width
        layers.append(nn.Linear(dim, out))
        super().__init__(*layers)

    @property
    def output(self) -> nn.Linear:
        return self[-1]


class _PrototypeHead(nn.Module):
    """Expert logits from prototypes: each expert owns M unit vectors; its logit is a learned scale
    times the mean of its top-k cosines to u (u must be unit length). Keeps a course's many topical
    modes that one linear boundary would average away; k-means over the KB's states initialises it."""

    def __init__(self, dim: int, num_experts: int, cfg: HeadConfig):
        super().__init__()
        self.num_experts, self.per_expert, self.top_k = num_experts, int(cfg.prototypes), int(cfg.prototype_top_k)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_experts * self.per_expert, dim), dim=-1))
        self.log_scale = nn.Parameter(torch.tensor(math.log(PROTOTYPE_SCALE_INIT)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        cos = u @ F.normalize(self.prototypes, dim=-1).T  # (B, K·M)
        top = cos.view(-1, self.num_experts, self.per_expert).topk(self.top_k, dim=-1).values
        return self.log_scale.exp() * top.mean(-1)


def _set_prototypes(head: _PrototypeHead, unit: torch.Tensor, labels: torch.Tensor, experts, seed: int,
                    gen: torch.Generator) -> None:
    """Set each expert's prototypes in ``head`` to k-means centroids of its rows of ``unit`` (rows, H), unit
    length. ``experts``: how many (all of range(experts)) or which. An expert with no rows keeps its
    prototypes; one with fewer rows than prototypes repeats its rows (with a little noise)."""
    from sklearn.cluster import KMeans

    m = head.per_expert
    for e in range(experts) if isinstance(experts, int) else experts:
        rows = unit[labels == e]
        if rows.shape[0] == 0:
            continue
        if rows.shape[0] <= m:
            picks = torch.arange(m) % rows.shape[0]
            centers = rows[picks] + 0.01 * torch.randn(m, rows.shape[1], generator=gen)
        else:
            km = KMeans(n_clusters=m, n_init=1, random_state=seed, max_iter=100).fit(rows.numpy())
            centers = torch.from_numpy(km.cluster_centers_).float()
        head.prototypes[e * m:(e + 1) * m] = F.normalize(centers, dim=-1).to(head.prototypes.device)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    x = x.clamp(max=_LOG_P_MAX)
    near_zero = x > -0.6931471805599453
    # each branch only sees inputs in its own safe range: torch.where would turn the unused branch's
    # infinite gradient (log1p(-exp(x)) at x ≈ 0) into NaN
    hi = torch.where(near_zero, x, torch.full_like(x, -1.0))
    lo = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(hi)), torch.log1p(-torch.exp(lo)))


def dact_step(log_y: torch.Tensor, log_h: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None):
    """One step of the DACT recursion in log space.

    In: log y_n (B, K), log h_n (B,), and (log a_{n-1}, log p_{n-1}) or None at n = 1.
    Out: (log a_n (B, K), log p_n (B,)).
    """
    if prev is None:  # p_0 = 1, a_0 = 0: a_1 = y_1
        return log_y, log_h
    log_a_prev, log_p_prev = prev
    log_a = torch.logaddexp(log_y + log_p_prev[:, None], log_a_prev + _log1mexp(log_p_prev)[:, None])
    return log_a, log_p_prev + log_h


def exit_margin(log_a: torch.Tensor, log_p: torch.Tensor, layers_left: int) -> torch.Tensor:
    """a_n[c*]·(1 − p_n)^d − (a_n[c_ru] + d·p_n) per row; the exit rule holds where this is ≥ 0.

    In: log a_n (B, K), log p_n (B,), d = layers left (0 at the last layer). Out: (B,) float32.
    With one expert there is no runner-up and the margin is 1. At an exact float tie (margin 0) the
    row exits: the bound then still gives a_N[c*] ≥ a_N[c] for every c.
    """
    a = log_a.float().exp()
    if a.shape[-1] == 1:  # one expert: no runner-up, the answer is final at once
        return torch.ones_like(a[:, 0])
    top = a.topk(2, dim=-1).values
    leader, runner_up = top[:, 0], top[:, 1]
    if layers_left == 0:
        return leader - runner_up
    log_p = log_p.float()
    one_minus_p = -torch.expm1(log_p.clamp(max=_LOG_P_MAX))
    return leader * one_minus_p.pow(layers_left) - (runner_up + layers_left * log_p.exp())


def exit_condition(log_a: torch.Tensor, log_p: torch.Tensor, layers_left: int) -> torch.Tensor:
    """(B,) bool: the DACT bound says the top class of a_n is final. Everyone exits when d = 0."""
    if layers_left == 0:
        return torch.ones(log_a.shape[0], dtype=torch.bool, device=log_a.device)
    return exit_margin(log_a, log_p, layers_left) >= 0


def _bidirectional_mask():
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError as e:  # transformers < 5 builds masks inside each model; we call layers directly
        raise ImportError(
            "moegate.models.dact needs transformers >= 5 "
            "(transformers.masking_utils.create_bidirectional_mask)"
        ) from e
    return create_bidirectional_mask


class DactRouterModel(nn.Module):
    """A base HF encoder plus one DACT unit per layer (shared projection, per-layer heads).

    ``encoder``: a BertModel, RobertaModel, XLMRobertaModel, ElectraModel or DistilBertModel (the base
    model, not a ``...ForSequenceClassification`` wrapper). Its pooler, unused here, is removed.
    """

    def __init__(self, encoder: nn.Module, num_experts: int, head: HeadConfig | None = None):
        super().__init__()
        head = head if head is not None else HeadConfig()
        if isinstance(head, dict):
            head = HeadConfig(**head)
        if int(num_experts) < 1:
            raise ValueError(f"num_experts: expected ≥ 1, got {num_experts!r}")
        self.model_type = _check_encoder(encoder)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # [CLS] goes to the DACT units, never through BERT's NSP pooler
        self.encoder = encoder
        self.num_experts = int(num_experts)
        self.head_config = head
        hidden = int(encoder.config.hidden_size if hasattr(encoder.config, "hidden_size") else encoder.config.dim)
        n = len(self._layers)
        self.hidden_size = hidden
        if head.classifier == "prototypes":
            # u_n = normalize(W (c_n − μ_n)): W starts as the identity, so the units start in the encoder's
            # own geometry (cosine between mean-pooled states), centred per layer (μ_n: the training rows'
            # mean state at layer n) because early layers share one large common direction.
            linear = nn.Linear(hidden, hidden)
            nn.init.eye_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.projection = nn.Sequential(linear, nn.Dropout(head.dropout))
            self.register_buffer("center", torch.zeros(n, hidden))
            self.classifiers = nn.ModuleList(_PrototypeHead(hidden, self.num_experts, head) for _ in range(n))
            # the halting head also sees how sure y_n is (top probability, margin to the runner-up)
            self.halting = nn.ModuleList(_Head(hidden + 2, 1, head) for _ in range(n))
            if head.last_layer == "kb":  # set by init_kb_prototypes, then left as they are
                last = self.classifiers[-1]
                last.prototypes.requires_grad_(False)
                if head.kb_scale is not None:
                    # Fixed and sharp: the KB's cosines differ between courses by a few hundredths, and a
                    # scale learned on synthetic questions (which the kb layer fits less well than the
                    # trained layers) flattens y_N until the early layers outvote it in a_N.
                    last.log_scale.data.fill_(math.log(float(head.kb_scale)))
                    last.log_scale.requires_grad_(False)
        else:
            self.projection = nn.Sequential(
                nn.Linear(hidden, head.projection_dim), ACTIVATIONS[head.activation](), nn.Dropout(head.dropout)
            )
            self.center = None
            self.classifiers = nn.ModuleList(_Head(head.projection_dim, self.num_experts, head) for _ in range(n))
            self.halting = nn.ModuleList(_Head(head.projection_dim, 1, head) for _ in range(n))
        for g in self.halting:
            nn.init.zeros_(g.output.weight)
            nn.init.constant_(g.output.bias, HALTING_BIAS_INIT)
        self._mask = _bidirectional_mask()

    # -- the encoder, one layer at a time ----------------------------------------------------------
    @property
    def _layers(self) -> nn.ModuleList:
        if self.model_type == "distilbert":
            return self.encoder.transformer.layer
        return self.encoder.encoder.layer

    @property
    def num_layers(self) -> int:
        """N: transformer layers, each followed by a DACT unit."""
        return len(self._layers)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.embeddings(input_ids=input_ids)
        if hasattr(self.encoder, "embeddings_project"):  # ELECTRA: embedding size ≠ hidden size
            hidden = self.encoder.embeddings_project(hidden)
        return hidden

    def _layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """The (B, L) padding mask in the form the encoder's attention backend wants (or None)."""
        return self._mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def _run_layer(self, n: int, hidden: torch.Tensor, layer_mask) -> torch.Tensor:
        """Layer n (1-based) on hidden states (B, L, H) with a mask from :meth:`_layer_mask`."""
        out = self._layers[n - 1](hidden, attention_mask=layer_mask)
        return out[0] if isinstance(out, tuple) else out

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) hidden states → (B, H): [CLS], or the mean over each row's own tokens.

        Only a row's own tokens count, so a row's pooled state does not depend on its batch.
        """
        if self.head_config.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def _unit(self, n: int, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer n's DACT unit on c_n (B, H) from :meth:`_pool`: (log y_n (B, K), log h_n (B,)) in float32."""
        if self.center is not None:  # prototype units
            if n == self.num_layers and self.head_config.last_layer == "kb":
                u = F.normalize(pooled.float(), dim=-1)  # the encoder's own space: the KB index's cosine
            else:
                u = F.normalize(self.projection(pooled.float() - self.center[n - 1]), dim=-1)
            log_y = F.log_softmax(self.classifiers[n - 1](u).float(), dim=-1)
            top = log_y.exp().topk(min(2, self.num_experts), dim=-1).values
            margin = top[:, 0] - top[:, 1] if self.num_experts > 1 else top[:, 0]
            features = torch.cat([u * math.sqrt(self.hidden_size), top[:, :1], margin[:, None]], dim=-1)
            halt = self.halting[n - 1](features).float().squeeze(-1)
            return log_y, F.logsigmoid(halt)
        u = self.projection(pooled)
        logits = self.classifiers[n - 1](u).float()  # float32 even under autocast: the recursion needs it
        halt = self.halting[n - 1](u).float().squeeze(-1)
        return F.log_softmax(logits, dim=-1), F.logsigmoid(halt)

    @torch.no_grad()
    def init_prototypes(self, states: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                        experts: list[int] | None = None, recenter: bool = True) -> None:
        """Centre each layer on the mean of ``states`` and set every expert's prototypes to k-means
        centroids of its rows' centred, unit-length states at that layer.

        In: states (N, rows, H) pooled states of labelled rows (the KB windows, ideally), labels (rows,).
        An expert with fewer rows than prototypes repeats its rows (with a little noise).
        ``experts``: set only these experts' prototypes (the others keep theirs); ``recenter`` False keeps
        the layer centres (a warm-started router adding an expert: its old prototypes live around them).
        With ``router.head.last_layer: kb`` the last layer is left to :meth:`init_kb_prototypes`.
        """
        if self.center is None:
            raise ValueError("init_prototypes: router.head.classifier is not 'prototypes'")
        states, labels = torch.as_tensor(states).float().cpu(), torch.as_tensor(labels).long().cpu()
        if states.shape[0] != self.num_layers or states.shape[1] != labels.shape[0]:
            raise ValueError(f"init_prototypes: states {tuple(states.shape)} do not match {self.num_layers} layers "
                             f"and {labels.shape[0]} labels")
        gen = torch.Generator().manual_seed(seed)
        layers = self.num_layers - (self.head_config.last_layer == "kb")  # kb: init_kb_prototypes sets the last
        for n in range(layers):
            if recenter:
                self.center[n] = states[n].mean(0).to(self.center.device)
            center = self.center[n].cpu()
            unit = F.normalize(states[n] - center, dim=-1)
            _set_prototypes(self.classifiers[n], unit, labels, self.num_experts if experts is None else experts,
                            seed, gen)

    @torch.no_grad()
    def init_kb_prototypes(self, vectors: torch.Tensor, experts: torch.Tensor, seed: int = 0,
                           only: list[int] | None = None) -> None:
        """``router.head.last_layer: kb``: set the last layer's prototypes to k-means centroids of each
        expert's KB chunk vectors (the retrieval index: every chunk, unit length, uncentred).

        In: vectors (chunks, H), experts (chunks,) the expert index of each chunk; ``only``: set just these
        experts' prototypes (a warm start). The last unit then scores a question as retrieval routing
        does, but against M centroids per expert instead of every chunk.
        """
        if self.head_config.last_layer != "kb":
            raise ValueError("init_kb_prototypes: router.head.last_layer is not 'kb'")
        vectors, experts = torch.as_tensor(vectors).float().cpu(), torch.as_tensor(experts).long().cpu()
        if vectors.ndim != 2 or vectors.shape[1] != self.hidden_size or len(experts) != len(vectors):
            raise ValueError(f"init_kb_prototypes: vectors {tuple(vectors.shape)} and experts {tuple(experts.shape)} "
                             f"do not match the encoder's hidden size {self.hidden_size}")
        self.center[-1] = 0.0
        _set_prototypes(self.classifiers[-1], F.normalize(vectors, dim=-1), experts,
                        self.num_experts if only is None else only, seed, torch.Generator().manual_seed(seed))

    # -- training path -------------------------------------------------------------------------------
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, B, H) every layer's pooled state c_n: what the DACT units read. With a frozen encoder this
        is all the encoder contributes, so it is computed once per row and cached (the states stage)."""
        input_ids, attention_mask = _prepare(input_ids, attention_mask)
        hidden = self._embed(input_ids)
        layer_mask = self._layer_mask(hidden, attention_mask)
        pooled = []
        for n in range(1, self.num_layers + 1):
            hidden = self._run_layer(n, hidden, layer_mask)
            pooled.append(self._pool(hidden, attention_mask))
        return torch.stack(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DactOutput:
        """All N layers for every row (training and analysis). Rows must start with [CLS]."""
        return self.forward_states(self.states(input_ids, attention_mask))

    def forward_states(self, states: torch.Tensor) -> DactOutput:
        """The DACT units and recursion on pooled states (N, B, H) from :meth:`states` (or its cache)."""
        if states.dim() != 3 or states.shape[0] != self.num_layers:
            raise ValueError(f"states: expected ({self.num_layers}, rows, hidden), got {tuple(states.shape)}")
        state = None
        log_ys, log_hs, log_as, log_ps = [], [], [], []
        for n in range(1, self.num_layers + 1):
            log_y, log_h = self._unit(n, states[n - 1])
            state = dact_step(log_y, log_h, state)
            log_ys.append(log_y)
            log_hs.append(log_h)
            log_as.append(state[0])
            log_ps.append(state[1])
        log_a, log_y = torch.stack(log_as), torch.stack(log_ys)
        return DactOutput(
            log_a=log_a[-1],
            a=log_a.exp(),
            log_y=log_y,
            h=torch.stack(log_hs).exp(),
            p=torch.stack(log_ps).exp(),
        )

    @staticmethod
    def loss(out: DactOutput, labels: torch.Tensor, ponder_cost: float, layer_loss_weight: float = 0.0,
             teacher: torch.Tensor | None = None, teacher_weight: float = 0.0, label_weight: float = 1.0):
        """(total, nll, ponder): NLL(log a_N) and Σ_n p_n, each a mean over the batch's rows.

        total = v·[nll + β·mean_n NLL(log y_n)] + λ·ponder with v = ``label_weight``, λ = ``ponder_cost`` and
        β = ``layer_loss_weight`` (0 = plain DACT), plus, with a ``teacher`` distribution (B, K),
        w·[KL(teacher ‖ a_N) + β·mean_n KL(teacher ‖ y_n)] with w = ``teacher_weight``: the retrieval
        teacher distilled into the answer and every exit. v = 0 learns from the teacher alone.
        """
        nll = F.nll_loss(out.log_a, labels)
        ponder = out.p.sum(0).mean()
        total = float(label_weight) * nll + float(ponder_cost) * ponder
        n_layers, _, k = out.log_y.shape
        if layer_loss_weight and label_weight:
            per_layer = F.nll_loss(out.log_y.reshape(-1, k), labels.repeat(n_layers))  # mean over (n, row)
            total = total + float(label_weight) * float(layer_loss_weight) * per_layer
        if teacher is not None and teacher_weight:
            teacher = teacher.float()
            kl = F.kl_div(out.log_a, teacher, reduction="batchmean")
            if layer_loss_weight:
                kl = kl + float(layer_loss_weight) * F.kl_div(
                    out.log_y.reshape(-1, k), teacher.repeat(n_layers, 1), reduction="batchmean")
            total = total + float(teacher_weight) * kl
        return total, nll, ponder

    # -- inference -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (no dropout, BatchNorm running stats) and no autograd; restores the mode after."""
        was_training = self.training
        if was_training:  # walking the module tree costs ~ms: only when there is something to switch
            self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.train()

    def early_exit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Per-sample early exit: (probs (B, K) = a_n at each row's exit layer, exit_layer (B,) in 1..N).

        Each layer runs only on the rows still active; rows whose exit rule holds leave the batch
        (hidden states and masks are index-selected) before the next layer. Runs in eval mode.
        """
        with self._inference():
            input_ids, attention_mask = _prepare(input_ids, attention_mask)
            rows_total, n_layers = input_ids.shape[0], self.num_layers
            device = input_ids.device
            probs = torch.zeros(rows_total, self.num_experts, dtype=torch.float32, device=device)
            exit_layer = torch.full((rows_total,), n_layers, dtype=torch.long, device=device)
            if rows_total == 0:
                return probs, exit_layer
            rows = torch.arange(rows_total, device=device)  # original row index of each active row
            hidden = self._embed(input_ids)
            layer_mask = self._layer_mask(hidden, attention_mask)
            state = None
            for n in range(1, n_layers + 1):
                hidden = self._run_layer(n, hidden, layer_mask)
                state = dact_step(*self._unit(n, self._pool(hidden, attention_mask)), state)
                halt = exit_condition(state[0], state[1], n_layers - n)
                if not bool(halt.any()):
                    continue
                done = rows[halt]
                probs[done] = state[0][halt].exp()
                exit_layer[done] = n
                keep = (~halt).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                rows = rows.index_select(0, keep)
                state = (state[0].index_select(0, keep), state[1].index_select(0, keep))
                hidden = hidden.index_select(0, keep)
                attention_mask = attention_mask.index_select(0, keep)
                width = _attended_width(attention_mask)  # the leavers may have been the long rows
                hidden, attention_mask = hidden[:, :width], attention_mask[:, :width]
                layer_mask = self._layer_mask(hidden, attention_mask)
            return probs, exit_layer

    def exit_with_last_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The early exit's answer read off a run of all N layers, plus layer N's pooled state:
        (probs (B, K), exit_layer (B,), c_N (B, H) float32), for a score that needs the last layer (the
        off-topic ``kb_similarity``). probs and exit_layer are :meth:`early_exit`'s (:func:`exit_from_output`);
        only the compute saving is given up. Runs in eval mode."""
        with self._inference():
            states = self.states(input_ids, attention_mask)
            probs, exit_layer = exit_from_output(self.forward_states(states))
            return probs, exit_layer, states[-1].float()

    def full_depth(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """No early exit: (probs (B, K) = a_N, exit_layer (B,) = N for every row). Runs in eval mode."""
        with self._inference():
            out = self.forward(input_ids, attention_mask)
            n = torch.full((out.log_a.shape[0],), self.num_layers, dtype=torch.long, device=out.log_a.device)
            return out.log_a.exp(), n


def exit_from_output(out: DactOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample early exit read off an all-layer output: (probs (B, K), exit_layer (B,)).

    Row i exits at the first layer whose exit rule holds, with a_n there: exactly what
    :meth:`DactRouterModel.early_exit` returns for the same units (it just skips the later layers).
    Used to score the early exit on cached states, where running the layers is not the cost.
    """
    n_layers = out.a.shape[0]
    log_a = out.a.clamp_min(1e-38).log()
    log_p = out.p.clamp_min(1e-38).log()
    halted = torch.stack([exit_condition(log_a[n], log_p[n], n_layers - 1 - n) for n in range(n_layers)])
    first = halted.float().argmax(0)  # the last layer always halts, so every row has a first True
    rows = torch.arange(out.a.shape[1], device=out.a.device)
    return out.a[first, rows], first + 1


def _check_encoder(encoder: nn.Module) -> str:
    """The encoder's model_type if DactRouterModel can run it layer by layer, else a clear error."""
    config = getattr(encoder, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(encoder).__name__
    if model_type not in _SUPPORTED:
        raise TypeError(
            f"unsupported backbone {name} (model_type {model_type!r}): the DACT router runs the encoder layer "
            f"by layer and supports model types {', '.join(_SUPPORTED)}"
        )
    base = getattr(encoder, "base_model_prefix", None)
    if base and hasattr(encoder, base):  # e.g. BertForSequenceClassification holds .bert
        raise TypeError(f"{name} is a task model: pass its base encoder (model.{base}) to DactRouterModel")
    if getattr(config, "is_decoder", False):
        raise TypeError(f"{name} is configured as a decoder (is_decoder=True); the router needs a bidirectional encoder")
    return model_type


def _attended_width(attention_mask: torch.Tensor) -> int:
    """1 + the last column any row attends to (≥ 1)."""
    cols = attention_mask.bool().any(0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 1


def _prepare(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and the [CLS]-first layout; cut trailing columns that no row attends to."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (batch, length); got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if input_ids.shape[0] == 0:
        return input_ids, attention_mask
    if not bool(attention_mask[:, 0].bool().all()):
        bad = (~attention_mask[:, 0].bool()).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(
            f"rows {bad}: attention_mask[:, 0] is 0; the router reads [CLS] at position 0, so inputs must be "
            "right-padded (tokenizer padding_side='right')"
        )
    width = _attended_width(attention_mask)
    return input_ids[:, :width], attention_mask[:, :width]
