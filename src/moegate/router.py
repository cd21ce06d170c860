"""The public API: save a trained DACT router to a directory, load it back, and route questions.

    from moegate import Router
    router = Router.from_pretrained("results/router")
    router.route(["What is a p-value?"])[0].expert    # -> "dsci_101"

A router directory is laid out like a Hugging Face model directory. It holds ``config.json``
(``model_type`` "moegate-dact-router", the format version, labels with ``id2label`` / ``label2id``, the
backbone's HF config, head config, ``ponder_cost`` (λ; older routers say ``lambda_``, still read), the
exit rule, max length, the abstain score and its calibrated threshold, training metadata),
``backbone/config.json`` (the backbone's HF config again, where
``AutoConfig.from_pretrained(dir, subfolder="backbone")`` reads it),
``model.safetensors`` (the whole DactRouterModel state: encoder + DACT units), the tokenizer files,
``kb_index.safetensors`` when the router abstains on ``kb_similarity`` (the KB windows' last-layer
states, :mod:`moegate.abstain`), a ``README.md`` model card with YAML front matter (rewritten with the
test metrics by the evaluate stage), and any extra JSON files the trainer adds (``training.json``).
Directories of format 1 (no model_type, id2label or backbone/) load as they are. Loading uses safetensors only: no pickle, no ``torch.load``. Directories saved
before the abstain block existed load as before: ``abstain_below`` is a threshold on the probability.

A damaged directory does not route: loading refuses a missing tokenizer file (HF would silently fall
back to a 5-token vocabulary and read every word as [UNK]), a tokenizer whose vocabulary is not the
one saved, weights holding NaN or ±inf or differing from the sha256 recorded at save time, and an exit
rule this code does not implement. Those errors are :class:`RouterError` (a MoegateError) naming the
file, tensor or key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moegate import __version__
from moegate.abstain import KB_INDEX_FILE, SCORES
from moegate.abstain import kb_similarity as similarity_to_kb
from moegate.errors import MoegateError
from moegate.io import atomic_dir, pinned_dir, read_json, wait_for_swap, write_json, write_text
from moegate.models.dact import EXIT_RULE, EXIT_RULES, DactRouterModel, HeadConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # config.json "moegate_router": bump when the directory layout changes
# 1: no model_type / id2label / backbone/; it loads as it is (nothing it holds has changed meaning)
READ_FORMATS = (1, FORMAT_VERSION)
MODEL_TYPE = "moegate-dact-router"  # config.json "model_type", as in a Hugging Face model directory
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"  # written by the evaluate stage
# backbone/config.json: the backbone's HF config, for AutoConfig.from_pretrained(dir, subfolder="backbone")
# (transformers does not know MODEL_TYPE, so it cannot read the top-level config.json)
BACKBONE_DIR = "backbone"
_RESERVED = {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, KB_INDEX_FILE, BACKBONE_DIR}
LOAD_ATTEMPTS = 3  # loads of a directory that an atomic_dir swap replaced mid-load, before giving up


class RouterError(MoegateError, ValueError):
    """A router directory that cannot route as it is: a damaged, mismatched or unknown file or key, or
    outputs that are not probabilities. The message names the directory, file, tensor or key."""


class RouterFileMissing(RouterError, FileNotFoundError):
    """A file the router directory needs is not there; the message names it."""


# -- saving ------------------------------------------------------------------------------------------
def save_router(
    path: str | os.PathLike,
    model: DactRouterModel,
    tokenizer,
    labels: list[str],
    max_length: int,
    ponder_cost: float,
    metadata: dict,
    extra_json: dict[str, dict] | None = None,
    abstain_below: float | None = None,
    abstain: dict | None = None,
    kb_index=None,
) -> Path:
    """Write a router directory at ``path`` atomically (a killed job leaves the old one or none).

    In: the trained model, its tokenizer, the expert labels in output order, the tokenizer max length,
    the ponder cost λ it was trained with, free-form ``metadata`` (training params, tuned values, study
    names), ``extra_json`` files ({"training.json": curves}), and how ``route`` abstains: ``abstain`` = {"score": "kb_similarity" |
    "probability", "threshold": float | None, "top_k": int (kb_similarity), ...calibration facts} with
    ``kb_index`` (a KBIndex of last-layer states, :func:`moegate.abstain.kb_index_from_states`) for
    kb_similarity; or just ``abstain_below``, a threshold on the probability. Out: the path.
    """
    from safetensors.torch import save_file

    labels = [str(x) for x in labels]
    if len(labels) != model.num_experts:
        raise ValueError(f"save_router: {len(labels)} labels for a model with {model.num_experts} experts")
    if len(set(labels)) != len(labels):
        raise ValueError(f"save_router: labels must be unique, got {labels}")
    for name in extra_json or {}:
        if Path(name).name != name or not name.endswith(".json") or name in _RESERVED:
            raise ValueError(f"save_router: extra_json key {name!r} must be a plain *.json file name "
                             f"other than {sorted(_RESERVED)}")
    abstain = _abstain_block(abstain, abstain_below, kb_index, labels, model.hidden_size)
    rows = model.encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"save_router: the tokenizer has {len(tokenizer)} tokens, the backbone only {rows} "
                         "embedding rows: not the backbone's tokenizer")
    config = {
        "model_type": MODEL_TYPE,
        "moegate_router": FORMAT_VERSION,
        "moegate_version": __version__,
        "labels": labels,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "num_experts": model.num_experts,
        "num_layers": model.num_layers,
        "max_length": int(max_length),
        "ponder_cost": float(ponder_cost),
        "abstain": abstain,
        "head": model.head_config.to_dict(),
        "exit_rule": EXIT_RULE,
        "backbone": model.encoder.config.to_dict(),
        "metadata": metadata,
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    bad = _nonfinite(state)
    if bad:
        raise ValueError(f"save_router: the model holds NaN or infinite values in {_first(bad)}")
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        model.encoder.config.save_pretrained(tmp / BACKBONE_DIR)
        # what loading checks: a missing tokenizer file would make HF fall back to another vocabulary,
        # and a weights file damaged into other finite values passes every other check
        config["tokenizer_files"] = sorted(p.name for p in tmp.iterdir() if p.name not in _RESERVED)
        config["tokenizer_vocab_size"] = len(tokenizer)
        config["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
        if kb_index is not None:
            kb_index.save(tmp / KB_INDEX_FILE)
            abstain["kb_index_sha256"] = _sha256(tmp / KB_INDEX_FILE)
        write_json(tmp / CONFIG_FILE, config)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)
        write_text(tmp / CARD_FILE, _model_card(config))
    log.info("saved router (%d experts, %d layers) to %s", len(labels), model.num_layers, path)
    return Path(path)


def _abstain_block(abstain: dict | None, abstain_below: float | None, kb_index, labels: list[str],
                   hidden: int) -> dict:
    """config.json's "abstain": the score route() abstains on and its threshold, checked."""
    if abstain is None:
        abstain = {"score": "probability", "threshold": abstain_below}
    elif abstain_below is not None:
        raise ValueError("save_router: pass abstain or abstain_below, not both")
    abstain = dict(abstain)
    score, threshold = abstain.get("score"), abstain.get("threshold")
    if score not in SCORES:
        raise ValueError(f"save_router: abstain score {score!r}, expected one of {list(SCORES)}")
    low = -1.0 if score == "kb_similarity" else 0.0
    if threshold is not None and not low <= float(threshold) <= 1.0:
        raise ValueError(f"save_router: abstain threshold {threshold!r} outside [{low:g}, 1] for {score}")
    if score == "kb_similarity":
        if kb_index is None:
            raise ValueError("save_router: abstain score kb_similarity needs the kb_index it compares with")
        if kb_index.labels != labels or kb_index.vectors.dim() != 2 or kb_index.vectors.shape[1] != hidden:
            raise ValueError(f"save_router: kb_index of {tuple(kb_index.vectors.shape)} vectors for {kb_index.labels} "
                             f"does not fit a router of hidden size {hidden} and labels {labels}")
        if int(abstain.get("top_k") or 0) < 1:
            raise ValueError(f"save_router: abstain top_k {abstain.get('top_k')!r}, expected a positive integer")
        abstain["kb_rows"] = len(kb_index)
    elif kb_index is not None:
        raise ValueError("save_router: a kb_index is saved only for the kb_similarity abstain score")
    return abstain


def _model_card(config: dict, metrics: dict | None = None) -> str:
    """README.md: YAML front matter (the Hub's model card metadata) and what the router does.
    Its metrics: the validation split's at training time, and the test split's once evaluate has run."""
    import yaml

    backbone = config["backbone"]
    metadata = config.get("metadata") or {}
    source = metadata.get("backbone_model") or backbone.get("_name_or_path") or backbone["model_type"]
    experts = "\n".join(f"  - `{x}`" for x in config["labels"])
    results = []
    val = metadata.get("val") or {}
    if val:
        results.append(_card_result("validation", "synthetic questions, validation split", val.get("accuracy"),
                                    val.get("mean_layers")))
    if metrics:
        exit_ = metrics.get("router_early_exit") or {}
        results.append(_card_result("test", "synthetic questions, test split", exit_.get("accuracy"),
                                    exit_.get("mean_layers")))
    front = {
        "library_name": "moegate",
        "pipeline_tag": "text-classification",
        "tags": ["moegate", "query-routing", "early-exit", "dact", "mixture-of-experts", "rag"],
        "base_model": str(source),
    }
    results = [r for r in results if r["metrics"]]
    if results:
        front["model-index"] = [{"name": "moegate router", "results": results}]
    evaluated = ("Evaluation results are in `metrics.json`." if metrics else
                 "Evaluation results, when the evaluate stage has run, are in `metrics.json`.")
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---

# moegate router

A DACT early-exit query router for a Mixture of RAG experts: it reads a question and names the
expert, with a probability for every expert, leaving the encoder as soon as the answer cannot change.

- backbone: `{source}` ({backbone['model_type']}, {config['num_layers']} layers); its HF config is
  `backbone/config.json` (`AutoConfig.from_pretrained(dir, subfolder="backbone")`)
- experts ({config['num_experts']}):
{experts}
- ponder cost λ = {config['ponder_cost']}; max length {config['max_length']} tokens
- exit rule ({config['exit_rule']['name']}): `{config['exit_rule']['formula']}`
- abstains (expert = null) when {config['abstain']['score']} < {config['abstain']['threshold']}

```python
from moegate import Router
router = Router.from_pretrained("path/to/this/dir")
router.route("your question")  # .expert, .probability, .exit_layer, .distribution, .kb_similarity
```

Command line: `moegate route --router path/to/this/dir "your question"`; over HTTP:
`moegate serve --router path/to/this/dir`.
{evaluated}
"""


def _card_result(split: str, name: str, accuracy, mean_layers) -> dict:
    """One model-index result of the card: accuracy and mean exit layer of the early exit on ``split``."""
    found = [{"type": "accuracy", "name": f"{split} accuracy (early exit)", "value": accuracy},
             {"type": "mean_exit_layer", "name": f"{split} mean exit layer", "value": mean_layers}]
    return {"task": {"type": "text-classification", "name": "query routing"},
            "dataset": {"type": "moegate-synthetic", "name": name, "split": split},
            "metrics": [{**m, "value": round(float(m["value"]), 4)} for m in found if m["value"] is not None]}


def write_model_card(path: str | os.PathLike, metrics: dict | None = None) -> Path:
    """Rewrite the README.md of the router directory ``path`` from its config.json, with the test
    metrics of the evaluate stage (``metrics``, what it writes to metrics.json) in the front matter."""
    path = Path(path)
    card = path / CARD_FILE
    config = _read_router_config(path / CONFIG_FILE)
    if "abstain" not in config:  # format 1 before the abstain block
        config["abstain"] = {"score": "probability", "threshold": config.get("abstain_below")}
    write_text(card, _model_card(config, metrics))
    return card


# -- loading and routing -----------------------------------------------------------------------------
@dataclass
class RouteResult:
    """One question's routing: the chosen expert (None = abstain), its probability, the encoder layer
    the answer left at (1..N), expert → probability (the top_k most likely, descending), and the
    question's similarity to the knowledge bases (None unless the router abstains on it)."""

    expert: str | None
    probability: float
    exit_layer: int
    distribution: dict[str, float] = field(default_factory=dict)
    kb_similarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RouteScores:
    """What the model computes for a list of questions, before the per-call choices of
    :meth:`Router.decide` (top_k, the abstain threshold): probs (n, K) float32, exit_layer (n,) int64,
    kb_similarity (n,) float32 or None."""

    probs: np.ndarray
    exit_layer: np.ndarray
    kb_similarity: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def rows(self, start: int, stop: int) -> RouteScores:
        """The scores of questions start..stop-1 (one request's share of a server batch)."""
        sim = None if self.kb_similarity is None else self.kb_similarity[start:stop]
        return RouteScores(self.probs[start:stop], self.exit_layer[start:stop], sim)


class Router:
    """A loaded router: ``route`` for applications, ``predict`` / ``predict_tokens`` for evaluation."""

    def __init__(self, model: DactRouterModel, tokenizer, labels: list[str], max_length: int,
                 config: dict | None = None, device: torch.device | str = "cpu",
                 path: str | os.PathLike | None = None, kb_index=None):
        self.path = None if path is None else Path(path)  # the directory it was loaded from (for errors)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = _token_limit(int(max_length), model, tokenizer)
        self.config = config or {}
        # routers saved before the abstain block: abstain_below was a threshold on the probability
        self.abstain = dict(self.config.get("abstain") or {"score": "probability",
                                                            "threshold": self.config.get("abstain_below")})
        self.abstain_score = self.abstain["score"]
        self.abstain_below = self.abstain.get("threshold")
        self.kb_index = kb_index
        if self.abstain_score == "kb_similarity" and kb_index is None:
            raise RouterError(f"router {self.path or '(in memory)'}: abstains on kb_similarity but has no kb_index")
        self.ponder_cost = self.config.get("ponder_cost")

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Router:
        """Load a directory written by :func:`save_router`. Missing, damaged or mismatched files are
        errors that name the file (and the tensor keys): FileNotFoundError for a missing one,
        :class:`RouterError` for the rest.

        Every file is read from one version of the directory: when a new save is swapped in while this
        reads (:func:`moegate.io.pinned_dir`), it loads again."""
        path = Path(path)
        for _ in range(LOAD_ATTEMPTS):
            wait_for_swap(path)
            with pinned_dir(path) as unchanged:
                try:
                    router = cls._load(path, device)
                except (OSError, ValueError):
                    if unchanged():
                        raise
                    continue  # a file of the old version vanished or mismatched mid-load: load the new one
                if unchanged():
                    return router
            log.info("%s was replaced while it was being loaded; loading it again", path)
        raise RouterError(f"{path}: replaced by a new save {LOAD_ATTEMPTS} times while loading; is a training "
                          "job writing it in a loop?")

    @classmethod
    def _load(cls, path: Path, device: str | torch.device) -> Router:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if not path.is_dir():
            raise RouterFileMissing(f"{path}: router directory not found")
        config = _read_router_config(path / CONFIG_FILE)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise RouterFileMissing(f"{weights}: missing (a router directory stores its weights as safetensors)")
        if not (path / "tokenizer_config.json").is_file():
            raise RouterFileMissing(f"{path / 'tokenizer_config.json'}: missing (the router's tokenizer files)")
        for name in config.get("tokenizer_files", []):
            if not (path / name).is_file():
                raise RouterFileMissing(
                    f"{path / name}: missing, one of the tokenizer files saved with this router "
                    f"({', '.join(config['tokenizer_files'])}); without it the tokenizer would fall back to "
                    f"another vocabulary. Restore it from the training run or retrain the router")

        backbone = dict(config["backbone"])
        model_type = backbone.pop("model_type")
        try:
            encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **backbone))
        except (KeyError, ValueError, TypeError) as e:
            raise RouterError(f"{path / CONFIG_FILE}: cannot rebuild backbone {model_type!r}: {e}") from e
        model = DactRouterModel(encoder, len(config["labels"]), HeadConfig(**config["head"]))

        try:
            state = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError) as e:
            raise RouterError(f"{weights}: not a readable safetensors file: {e}") from e
        _check_state(weights, model.state_dict(), state)
        bad = _nonfinite(state)
        if bad:
            raise RouterError(f"{weights}: NaN or infinite values in tensor(s) {_first(bad)}: the file is damaged "
                              "(or training diverged); restore it or retrain the router")
        digest = config.get("weights_sha256")
        if digest is not None and _sha256(weights) != digest:
            raise RouterError(f"{weights}: its sha256 differs from weights_sha256 in {CONFIG_FILE}, recorded when the "
                              "router was saved: the file was damaged or replaced since; restore it or retrain")
        model.load_state_dict(state, strict=True)
        # after the weights: labels that do not fit them are named there first; HF tools read id2label
        expected = {str(i): label for i, label in enumerate(config["labels"])}
        if "id2label" in config and config["id2label"] != expected:  # format 1 has none
            raise RouterError(f"{path / CONFIG_FILE}: key 'id2label' {config['id2label']!r} does not match "
                              f"'labels' {config['labels']!r}")
        if model.num_layers != config["num_layers"]:
            raise RouterError(f"{path / CONFIG_FILE}: num_layers {config['num_layers']} but the backbone has "
                              f"{model.num_layers}")

        kb_index = _load_kb_index(path, config, model)
        # the backbone's config tells AutoTokenizer the model type (the directory's config.json is the router's)
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=model.encoder.config)
        _check_vocabulary(path, config, tokenizer, model)
        if getattr(tokenizer, "padding_side", "right") != "right":
            tokenizer.padding_side = "right"  # the model reads [CLS] at position 0
        from moegate.encoder import device as pick_device

        dev = pick_device(device) if device in ("auto", "cuda", "cpu") else torch.device(device)
        log.info("loaded router %s: %d experts, %d layers, on %s", path, len(config["labels"]), model.num_layers, dev)
        return cls(model, tokenizer, config["labels"], config["max_length"], config=config, device=dev, path=path,
                   kb_index=kb_index)

    # -- predictions ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), int64 (n, ≤ max_length), right-padded, truncated."""
        texts = _check_texts(texts)
        if not texts:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return empty, empty.clone()
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def predict(self, texts: Sequence[str], early_exit: bool = True, batch_size: int = 64):
        """(probs (n, K) float32, exit_layer (n,) int64) for each text, in input order."""
        input_ids, attention_mask = self.tokenize(texts)
        return self.predict_tokens(input_ids, attention_mask, early_exit=early_exit, batch_size=batch_size)

    def predict_tokens(self, input_ids, attention_mask, early_exit: bool = True, batch_size: int = 64):
        """Like :meth:`predict` on pre-tokenized, right-padded (n, L) tensors or arrays.

        Rows are batched by length (less padding); each batch leaves the encoder row by row with the
        early exit, or runs all layers with ``early_exit=False``. Results come back in input order.
        """
        run = self.model.early_exit if early_exit else self.model.full_depth
        empty = [np.zeros((0, len(self.labels)), np.float32), np.zeros(0, np.int64)]
        probs, exit_layer = self._batched(input_ids, attention_mask, batch_size, run, empty)
        self._check_finite(probs)
        return probs, exit_layer

    def _batched(self, input_ids, attention_mask, batch_size: int, run, empty: list[np.ndarray]) -> list[np.ndarray]:
        """``run(ids, mask) -> tensors (b, ...)`` over length-sorted batches of rows, as arrays in input order
        (``empty`` when there are no rows)."""
        from tqdm.auto import tqdm

        input_ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()  # batches move to the device one by one
        attention_mask = torch.as_tensor(attention_mask, dtype=torch.long).cpu()
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (rows, length); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected ≥ 1, got {batch_size!r}")
        n = input_ids.shape[0]
        if n == 0:
            return empty
        order = torch.argsort(attention_mask.sum(1), stable=True)
        starts = range(0, n, int(batch_size))
        if len(starts) > 1:  # a bar costs ~0.1 ms: not for the one-batch calls a RAG app makes
            starts = tqdm(starts, desc="routing", unit="batch", disable=None, leave=False)
        outputs = None
        for start in starts:
            idx = order[start : start + int(batch_size)]
            parts = run(input_ids[idx].to(self.device), attention_mask[idx].to(self.device))
            if outputs is None:
                outputs = [np.zeros((n, *p.shape[1:]), dtype=np.float32 if p.is_floating_point() else np.int64)
                           for p in parts]
            for out, p in zip(outputs, parts):
                out[idx.numpy()] = (p.float() if p.is_floating_point() else p).cpu().numpy()
        return outputs

    def _check_finite(self, probs: np.ndarray) -> None:
        bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
        if bad.size:  # never hand on NaN: argmax would read it as expert 0, a threshold test as "not below"
            raise RouterError(f"router {self.path or '(in memory)'}: NaN or infinite probabilities for {bad.size} of "
                              f"{len(probs)} rows (rows {_first([int(i) for i in bad])}); its weights are damaged or "
                              "overflow on these inputs")

    def scores(self, texts: Sequence[str], batch_size: int = 64, kb_similarity: bool | None = None) -> RouteScores:
        """The model's part of :meth:`route` for a list of texts: probabilities and exit layers of the early
        exit, and ``kb_similarity`` when the router abstains on it (or ``kb_similarity=True`` asks for it;
        it needs all N layers, so every row runs them, its answer still the early exit's)."""
        want = self.abstain_score == "kb_similarity" if kb_similarity is None else bool(kb_similarity)
        if not want:
            return RouteScores(*self.predict(texts, early_exit=True, batch_size=batch_size))
        if self.kb_index is None:
            raise RouterError(f"router {self.path or '(in memory)'}: no {KB_INDEX_FILE}, so no kb_similarity "
                              "(routers trained before it was saved abstain on the probability)")
        input_ids, attention_mask = self.tokenize(texts)
        empty = [np.zeros((0, len(self.labels)), np.float32), np.zeros(0, np.int64),
                 np.zeros((0, self.model.hidden_size), np.float32)]
        probs, exit_layer, last = self._batched(input_ids, attention_mask, batch_size,
                                                self.model.exit_with_last_state, empty)
        self._check_finite(probs)
        return RouteScores(probs, exit_layer, similarity_to_kb(self.kb_index, torch.from_numpy(last),
                                                            int(self.abstain.get("top_k") or 10)))

    def route_options(self, top_k: int | None = None, abstain_below: float | None = None) -> tuple[int, float | None]:
        """(experts kept in .distribution, the abstain threshold in force) for :meth:`route`'s options;
        ValueError naming the option when one is out of range."""
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"top_k: expected a positive integer or None, got {top_k!r}")
        threshold = self.abstain_below if abstain_below is None else abstain_below
        low = -1.0 if self.abstain_score == "kb_similarity" else 0.0
        if threshold is not None and not low <= float(threshold) <= 1.0:
            what = "a cosine in [-1, 1]" if low < 0 else "a probability in [0, 1]"
            raise ValueError(f"abstain_below: expected {what} ({self.abstain_score}), got {threshold!r}")
        k = len(self.labels) if top_k is None else min(int(top_k), len(self.labels))
        return k, None if threshold is None else float(threshold)

    def decide(self, scores: RouteScores, top_k: int | None = None,
               abstain_below: float | None = None) -> list[RouteResult]:
        """RouteResults from :meth:`scores`: ``top_k`` keeps only the k most likely experts in
        ``.distribution``; ``.expert = None`` where the router's abstain score (``abstain_score``:
        kb_similarity or the top probability) is below ``abstain_below`` (default: the saved threshold)."""
        k, threshold = self.route_options(top_k, abstain_below)
        if self.abstain_score == "kb_similarity" and scores.kb_similarity is None:
            raise ValueError("decide: this router abstains on kb_similarity; the scores lack it")
        results = []
        for i, (row, layer) in enumerate(zip(scores.probs, scores.exit_layer)):
            ranked = np.argsort(-row, kind="stable")  # ties: the earlier label first, like argmax
            best = float(row[ranked[0]])
            sim = None if scores.kb_similarity is None else float(scores.kb_similarity[i])
            value = sim if self.abstain_score == "kb_similarity" else best
            # "not ≥": anything that is not a score at or above the threshold abstains
            abstain = threshold is not None and not value >= threshold
            results.append(RouteResult(
                expert=None if abstain else self.labels[ranked[0]],
                probability=best,
                exit_layer=int(layer),
                distribution={self.labels[j]: float(row[j]) for j in ranked[:k]},
                kb_similarity=sim,
            ))
        return results

    def route(self, texts: str | Sequence[str], top_k: int | None = None, abstain_below: float | None = None,
              batch_size: int = 64) -> RouteResult | list[RouteResult]:
        """One RouteResult per text, in order; a single string gives a single RouteResult.

        ``top_k`` keeps only the k most likely experts in ``.distribution``; ``abstain_below`` sets
        ``.expert = None`` when the router's abstain score (``abstain_score``: the question's
        kb_similarity, or its top probability for routers that abstain on it) is below it (default: the
        threshold calibrated on validation questions and saved with the router; None = never).
        """
        single = isinstance(texts, str)
        results = self.decide(self.scores([texts] if single else texts, batch_size=batch_size), top_k, abstain_below)
        return results[0] if single else results

    def __repr__(self) -> str:
        return f"Router(experts={self.labels}, layers={self.num_layers}, device={self.device})"


def _token_limit(max_length: int, model: DactRouterModel, tokenizer) -> int:
    """max_length, lowered to what the backbone's position embeddings and the tokenizer can take."""
    config = model.encoder.config
    limits = [max_length]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:  # RoBERTa-style position ids start after the padding index
        offset = config.pad_token_id + 1 if model.model_type in ("roberta", "xlm-roberta") else 0
        limits.append(int(positions) - offset)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 1_000_000:  # HF's "no limit" is a huge sentinel
        limits.append(tok_limit)
    if min(limits) < max_length:
        log.warning("max_length %d is more than the backbone takes; truncating questions to %d tokens",
                    max_length, min(limits))
    return min(limits)


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("predict takes a list of strings; wrap a single question in a list (route takes either)")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected a string, got {type(t).__name__}")
    return texts


def _read_router_config(path: Path) -> dict:
    config = read_json(path)  # names the file when missing or not JSON
    if not isinstance(config, dict) or "moegate_router" not in config:
        raise RouterError(f"{path}: not a moegate router config (no 'moegate_router' key; "
                          "is this a backbone directory?)")
    version = config["moegate_router"]
    if isinstance(version, bool) or version not in READ_FORMATS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise RouterError(f"{path}: router format {version!r}, this moegate ({__version__}) reads formats "
                          f"{', '.join(map(str, READ_FORMATS))}" + ("; upgrade moegate to load it" if newer else ""))
    if version >= 2 and config.get("model_type") != MODEL_TYPE:
        raise RouterError(f"{path}: key 'model_type' is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    required = {"labels": list, "max_length": int, "num_layers": int, "head": dict, "backbone": dict}
    wrong = [f"key {key!r} must be a {kind.__name__}, got {config.get(key)!r}"
             for key, kind in required.items() if not isinstance(config.get(key), kind)]
    if wrong:
        raise RouterError(f"{path}: " + "; ".join(wrong))
    if "model_type" not in config["backbone"]:
        raise RouterError(f"{path}: key 'backbone' has no 'model_type'")
    if not config["labels"]:
        raise RouterError(f"{path}: key 'labels' is empty")
    _check_exit_rule(path, config.get("exit_rule"))
    if "lambda_" in config and "ponder_cost" not in config:  # saved before the key was renamed
        config["ponder_cost"] = config.pop("lambda_")
    abstain = config.get("abstain")
    if abstain is not None and (not isinstance(abstain, dict) or abstain.get("score") not in SCORES):
        score = abstain.get("score") if isinstance(abstain, dict) else abstain
        raise RouterError(f"{path}: abstain score {score!r} is not one this moegate computes (known: {list(SCORES)})")
    return config


def _load_kb_index(path: Path, config: dict, model: DactRouterModel):
    """The router's ``kb_index.safetensors`` (routers that abstain on kb_similarity), checked against
    config.json: its digest, labels, width and values. None for the other routers."""
    from safetensors import SafetensorError

    from moegate.retrieval import KBIndex

    abstain = config.get("abstain") or {}
    if abstain.get("score") != "kb_similarity":
        return None
    file = path / KB_INDEX_FILE
    if not file.is_file():
        raise RouterFileMissing(f"{file}: missing; {CONFIG_FILE} says this router abstains on kb_similarity, "
                                "which compares a question with these KB states. Restore it or retrain the router")
    digest = abstain.get("kb_index_sha256")
    if digest is not None and _sha256(file) != digest:
        raise RouterError(f"{file}: its sha256 differs from abstain.kb_index_sha256 in {CONFIG_FILE}: damaged or "
                          "replaced since the router was saved; restore it or retrain")
    try:
        index = KBIndex.load(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise RouterError(f"{file}: not a readable KB index: {e}") from e
    if index.labels != config["labels"] or index.vectors.dim() != 2 or index.vectors.shape[1] != model.hidden_size:
        raise RouterError(f"{file}: {tuple(index.vectors.shape)} vectors for {index.labels}; the router has hidden "
                          f"size {model.hidden_size} and labels {config['labels']}")
    if not bool(torch.isfinite(index.vectors).all()):
        raise RouterError(f"{file}: NaN or infinite values; restore it or retrain the router")
    return index


def _check_exit_rule(path: Path, rule) -> None:
    """The exit rule config.json records must be one :func:`moegate.models.dact.exit_condition` implements,
    word for word: a router trained for another rule would exit where its training did not expect."""
    name = rule.get("name") if isinstance(rule, dict) else rule
    known = ", ".join(repr(k) for k in EXIT_RULES)
    if not isinstance(name, str) or name not in EXIT_RULES:
        raise RouterError(f"{path}: exit_rule {name!r} is not a rule this moegate implements (known: {known})")
    formula = rule.get("formula") if isinstance(rule, dict) else None
    if formula != EXIT_RULES[name]["formula"]:
        raise RouterError(f"{path}: exit_rule {name!r} has formula {formula!r}, but this moegate's {name} is "
                          f"{EXIT_RULES[name]['formula']!r}")


def _check_vocabulary(path: Path, config: dict, tokenizer, model: DactRouterModel) -> None:
    """The loaded tokenizer must be the saved one: its size as config.json records it (routers saved
    before that was recorded: the backbone's embedding rows), and never more than the embedding rows."""
    size = len(tokenizer)
    rows = model.encoder.get_input_embeddings().num_embeddings
    saved = config.get("tokenizer_vocab_size")
    expected, source = (rows, "the backbone's embedding rows") if saved is None else (saved, f"{CONFIG_FILE} records")
    if size != expected or size > rows:
        files = ", ".join(sorted(p.name for p in path.iterdir() if p.name not in _RESERVED))
        raise RouterError(f"{path}: the tokenizer loaded from it has {size} tokens, {source} {expected} "
                          f"(embedding rows {rows}): its tokenizer files ({files}) are missing or not the "
                          "ones it was trained with; restore them from the training run or retrain")


def _check_state(file: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the file and the keys when tensors are missing, extra or mis-shaped."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_first(unexpected)}")
    if shapes:
        problems.append(f"mismatched shapes {_first(shapes)}")
    if problems:
        raise RouterError(f"{file}: does not match the model described by config.json: " + "; ".join(problems))


def _nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """'name (k of n values)' for every floating tensor holding NaN or ±inf."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point():
            count = int((~torch.isfinite(t)).sum())
            if count:
                bad.append(f"{name} ({count} of {t.numel()} values)")
    return bad


def _sha256(path: Path) -> str:
    from moegate.training import file_digest

    return file_digest(path)


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return json.dumps(items[:n]) + more
