"""Stage evaluate: score the router on every test row, against itself at full depth and the backbone alone.

In: ``router/``, ``backbone/``, ``dataset/test.parquet`` + ``dataset/tokenized/test.safetensors``.
    With ``evaluate.real_questions``: that CSV, ``dataset/train.parquet`` (the TF-IDF baseline) and,
    when the dataset stage wrote it, ``dataset/kb_index.safetensors`` (retrieval routing).
Out: ``router/metrics.json`` and ``evaluation/exit_layers.png``, ``evaluation/confusion.png``.

Three systems on the same rows: (a) the router with its per-sample early exit, (b) the same router
forced to run all N layers, (c) the fine-tuned backbone classifier (null, with ``backbone_skipped``
saying why, when it was trained on another expert set: ``backbone.rerun_on_dataset_change`` false
keeps it after an expert is added or removed). For each: accuracy, macro-F1,
per-expert recall and the confusion matrix; for (a) also the exit-layer histogram, the mean number of
layers run, and how often (a) and (b) pick the same expert — 1.0 by the exit rule's guarantee: a row
where they differ (other than at a float tie of full depth's top two) fails the stage
(:class:`ExitMismatchError`), on the test split and on the real questions alike.

With ``evaluate.real_questions`` (a CSV of real users' ``question,expert`` rows) the same is done on
those rows under ``metrics["real_questions"]``, beside two baselines that need no router: retrieval
routing over the KB index (``dataset/kb_index.safetensors``; null when the dataset came from a
labelled CSV and so has no index) and TF-IDF + logistic regression fitted on the training split.
Synthetic test questions resemble their training siblings; real ones show whether that transfers.

``metrics["abstain"]``: how the router's abstain score and its saved threshold (:mod:`moegate.abstain`)
do on in-domain questions (the test split's questions, the real questions) and on each CSV of
``evaluate.off_topic_questions`` (questions no expert covers): the share abstained on, and the AUROC of
each score the router can compute (kb_similarity, probability) separating the in-domain real questions
(else the test questions) from each off-topic set and from all of them together.
``mcnemar_vs_retrieval`` pairs each method with retrieval routing on the same rows: ``b`` = rows the
method gets right and retrieval wrong, ``c`` = the reverse, ``p_value`` = exact two-sided McNemar.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moegate.encoder import device as pick_device
from moegate.io import read_text_csv, save_figure, write_json
from moegate.layout import Layout
from moegate.models.backbone import BackboneClassifier, classify, load_backbone_classifier
from moegate.training import TokenSplit, load_tokens, read_labels, to_device

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 64  # inference only: larger batches just cost memory
# full depth's top two this close are a float tie: the exit rule gives a_N[c*] ≥ a_N[c] up to rounding
# (~1e-7), so at a tie either expert is the full-depth answer
TIE_TOLERANCE = 1e-5


class ExitMismatchError(RuntimeError):
    """Early exit and full depth picked different experts: the exit rule's guarantee failed, a bug to look at."""


def check_exit_exact(probs_exit: np.ndarray, probs_full: np.ndarray, where: str) -> dict:
    """Raise ExitMismatchError naming how many rows of ``where`` pick another expert with the early exit
    than at full depth, float ties of full depth's top two apart. Out: {"disagreements": rows that differ,
    "disagreements_at_float_ties": how many of them are such ties}."""
    differ = probs_exit.argmax(1) != probs_full.argmax(1)
    top2 = -np.sort(-probs_full, axis=1)[:, :2] if probs_full.shape[1] > 1 else np.ones((len(probs_full), 2))
    tie = (top2[:, 0] - top2[:, 1]) <= TIE_TOLERANCE
    wrong = np.flatnonzero(differ & ~tie)
    if wrong.size:
        raise ExitMismatchError(
            f"evaluate: early exit and full depth pick different experts on {wrong.size} of {len(differ)} {where} "
            f"(rows {', '.join(str(int(i)) for i in wrong[:10])}{' ...' if wrong.size > 10 else ''}); the exit rule "
            "guarantees the full-depth answer, so this is a bug in the exit rule or the layer-by-layer run")
    return {"disagreements": int(differ.sum()), "disagreements_at_float_ties": int((differ & tie).sum())}


def classification_metrics(labels: list[str], truth: np.ndarray, predicted: np.ndarray) -> dict:
    """accuracy, macro_f1 (over every expert, absent ones included), per-expert recall/support, confusion.

    ``confusion[i][j]`` counts rows of true expert i routed to expert j. Recall of an expert with no
    test rows is null (undefined), not 0.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    k = range(len(labels))
    confusion = confusion_matrix(truth, predicted, labels=list(k))
    support = confusion.sum(axis=1)
    recall = {labels[i]: (float(confusion[i, i] / support[i]) if support[i] else None) for i in k}
    return {
        "rows": len(truth),
        "accuracy": float((truth == predicted).mean()) if len(truth) else float("nan"),
        "macro_f1": float(f1_score(truth, predicted, labels=list(k), average="macro", zero_division=0)),
        "per_expert_recall": recall,
        "support": {labels[i]: int(support[i]) for i in k},
        "confusion": confusion.tolist(),
    }


def exit_statistics(labels: list[str], truth: np.ndarray, exit_layer: np.ndarray, num_layers: int) -> dict:
    """Histogram of exit layers (1..N), mean layers run (overall and per true expert), share of N."""
    histogram = np.bincount(exit_layer, minlength=num_layers + 1)[1:]
    per_expert = {name: (float(exit_layer[truth == i].mean()) if (truth == i).any() else None)
                  for i, name in enumerate(labels)}
    mean = float(exit_layer.mean())
    return {"num_layers": num_layers, "histogram": {str(n + 1): int(c) for n, c in enumerate(histogram)},
            "mean_layers": mean, "layer_fraction": mean / num_layers, "mean_layers_per_expert": per_expert}


def plot_exit_layers(path, labels: list[str], truth: np.ndarray, exit_layer: np.ndarray, num_layers: int) -> None:
    """Stacked bars: test questions per exit layer, coloured by true expert, with the mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, num_layers + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bottom = np.zeros(num_layers)
    for i, name in enumerate(labels):
        counts = np.bincount(exit_layer[truth == i], minlength=num_layers + 1)[1:]
        ax.bar(layers, counts, bottom=bottom, label=name)
        bottom += counts
    mean = exit_layer.mean()
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
    ax.set(xlabel="exit layer", ylabel="test questions", xticks=layers,
           title=f"Router exit layers: {len(exit_layer)} test questions, mean {mean:.2f} of {num_layers}")
    ax.legend(title="true expert", fontsize="small", loc="best")
    save_figure(path, fig)
    plt.close(fig)


def plot_confusions(path, labels: list[str], systems: dict[str, dict]) -> None:
    """One row-normalised confusion matrix per system, side by side, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    size = max(3.2, 0.6 * k + 1.6)
    fig, axes = plt.subplots(1, len(systems), figsize=(size * len(systems), size), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], systems.items()):
        counts = np.asarray(metrics["confusion"], dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels if ax is axes[0][0] else [""] * k, fontsize=8)
        ax.set(xlabel="routed expert", title=f"{title}\naccuracy {metrics['accuracy']:.3f}")
    axes[0][0].set_ylabel("true expert")
    save_figure(path, fig)
    plt.close(fig)


def layer_accuracies(model, split, batch_size: int, device: torch.device) -> list[float]:
    """Accuracy of each layer's own classifier y_n on ``split``: what halting at layer n for every
    question would score. Shows how early the gate can answer; the exit rule decides per question."""
    correct = torch.zeros(model.num_layers, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for batch in split.batches(batch_size):
            batch = to_device(batch, device)
            out = model(batch["input_ids"], batch["attention_mask"])
            correct += (out.y.argmax(-1) == batch["labels"]).sum(1).cpu()
    return [round(c / max(1, len(split)), 6) for c in correct.tolist()]


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact two-sided McNemar test of two methods scored on the same rows.

    In: two boolean arrays (rows,), True where that method routed the row right.
    Out: ``{"p_value", "a_only", "b_only"}``: a_only = rows only A got right, b_only = only B. The
    p-value is the binomial test of the discordant pairs, min(1, 2 P(X <= min(a_only, b_only))) with
    X ~ Binomial(a_only + b_only, 1/2); 1.0 when the methods never disagree on correctness.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar_exact: expected two 1-d arrays of one length, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    if n == 0:
        return {"p_value": 1.0, "a_only": 0, "b_only": 0}
    # exact integers, one division: no underflow of 0.5**n for a few thousand discordant rows
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return {"p_value": min(1.0, 2 * tail / 2**n), "a_only": a_only, "b_only": b_only}


def read_real_questions(path: str | Path, labels: list[str]) -> tuple[list[str], np.ndarray]:
    """``evaluate.real_questions`` → (questions, label index of each row); other columns are ignored.

    Every row must be scorable: a missing file or column, an empty question or an expert outside
    ``labels`` raises ValueError naming the file and the rows (1 = first data row), since a silently
    dropped real question would change the score it is read for.
    """
    path = Path(path)
    raw = read_text_csv(path, ("question", "expert"), "real questions CSV", "evaluate.real_questions")
    if raw.empty:
        raise ValueError(f"{path}: no rows (evaluate.real_questions)")
    questions, experts = raw["question"].str.strip(), raw["expert"].str.strip()
    rows = np.arange(1, len(raw) + 1)  # 1 = first data row
    empty = (questions == "").to_numpy()
    if empty.any():
        raise ValueError(f"{path}: {int(empty.sum())} empty question(s) in row(s) {_rows(rows[empty])}")
    unknown = (~experts.isin(labels)).to_numpy()
    if unknown.any():
        counts = experts[unknown].value_counts().to_dict()
        raise ValueError(f"{path}: {int(unknown.sum())} row(s) ({_rows(rows[unknown])}) name experts the router "
                         f"does not know: {counts}; expected one of {labels}")
    index = {name: i for i, name in enumerate(labels)}
    return questions.tolist(), experts.map(index).to_numpy(dtype=np.int64)


def read_off_topic_questions(path: str | Path) -> list[str]:
    """An ``evaluate.off_topic_questions`` CSV → its questions (column ``question``; others ignored).
    A missing file or column, or an empty question, raises ValueError naming the file and rows."""
    path = Path(path)
    raw = read_text_csv(path, ("question",), "off-topic questions CSV", "evaluate.off_topic_questions")
    questions = raw["question"].str.strip()
    empty = (questions == "").to_numpy()
    if raw.empty or empty.any():
        where = f"empty question(s) in row(s) {_rows(np.arange(1, len(raw) + 1)[empty])}" if empty.any() else "no rows"
        raise ValueError(f"{path}: {where} (evaluate.off_topic_questions)")
    return questions.tolist()


def abstain_metrics(config: dict, router, in_domain: dict[str, list[str]]) -> dict:
    """``metrics["abstain"]``: abstain rates at the router's saved threshold and AUROCs (see the module
    docstring). ``in_domain``: name → questions every expert set covers ("test", "real_questions")."""
    from moegate.abstain import abstain_rate, auroc

    kb = router.kb_index is not None  # routers saved before kb_index: the probability only

    def scores(texts: list[str]) -> dict[str, np.ndarray]:
        s = router.scores(texts, batch_size=EVAL_BATCH_SIZE, kb_similarity=kb)
        out = {"probability": s.probs.max(1) if len(s) else np.zeros(0)}
        if kb:
            out["kb_similarity"] = s.kb_similarity
        return out

    score, threshold = router.abstain_score, router.abstain_below
    inside = {name: scores(texts) for name, texts in in_domain.items()}
    reference = "real_questions" if "real_questions" in inside else "test"
    outside = {str(p): scores(read_off_topic_questions(p)) for p in config["evaluate"]["off_topic_questions"]}

    def off_topic_entry(values: dict[str, np.ndarray]) -> dict:
        return {"rows": len(values[score]), "abstain_rate": abstain_rate(values[score], threshold),
                "auroc": {name: auroc(inside[reference][name], v) for name, v in values.items()}}

    out = {
        "score": score, "threshold": threshold, "max_in_domain_rate": router.abstain.get("max_in_domain_rate"),
        "calibration": router.abstain.get("calibration"),
        "in_domain": {name: {"rows": len(v[score]), "abstain_rate": abstain_rate(v[score], threshold)}
                      for name, v in inside.items()},
        "auroc_in_domain": reference,
        "off_topic": {path: off_topic_entry(v) for path, v in outside.items()},
    }
    if outside:
        pooled = {name: np.concatenate([v[name] for v in outside.values()]) for name in inside[reference]}
        out["off_topic_all"] = off_topic_entry(pooled)
        log.info("evaluate: abstain on %s < %s: in-domain %s; off-topic %.3f (AUROC %s)", score, threshold,
                 ", ".join(f"{k} {v['abstain_rate']:.3f}" for k, v in out["in_domain"].items()),
                 out["off_topic_all"]["abstain_rate"],
                 ", ".join(f"{k} {v:.3f}" for k, v in out["off_topic_all"]["auroc"].items() if v is not None))
    return out


def _rows(rows: np.ndarray, n: int = 10) -> str:
    more = f" (+{len(rows) - n} more)" if len(rows) > n else ""
    return ", ".join(str(int(r)) for r in rows[:n]) + more


def backbone_tokens(tokenizer, texts: list[str], truth: np.ndarray, max_length: int, source: str) -> TokenSplit:
    """``texts`` tokenized as the dataset stage does for the backbone: right-padded to ``max_length``."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=int(max_length), return_tensors="pt")
    return TokenSplit(enc["input_ids"].long(), enc["attention_mask"].long(), torch.as_tensor(truth, dtype=torch.long),
                      source=source)


def tfidf_predictions(train_path: Path, texts: list[str], seed: int) -> np.ndarray:
    """A baseline with no encoder: TF-IDF (1-2 grams) + logistic regression fitted on every training row."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train = pd.read_parquet(train_path, columns=["query", "label"])
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(max_iter=2000, C=10.0, random_state=int(seed)))
    model.fit(train["query"].astype(str).tolist(), train["label"].to_numpy())
    return np.asarray(model.predict(texts), dtype=np.int64)


def retrieval_predictions(config: dict, layout: Layout, labels: list[str], texts: list[str]) -> np.ndarray | None:
    """Retrieval routing's expert for each text, or None when the dataset stage wrote no KB index."""
    from moegate.retrieval import KBIndex, RetrievalRouter

    path = layout.kb_index
    if not path.is_file():
        log.info("evaluate: no %s (the dataset came from dataset.labelled_csv, so the KB stages did not run): "
                 "real_questions.retrieval_routing is null", path)
        return None
    index = KBIndex.load(path)
    if index.labels != labels:
        raise ValueError(f"{path}: labels {index.labels} differ from {layout.labels} {labels}; rerun the dataset stage")
    return RetrievalRouter(index, config, top_k=config["evaluate"]["retrieval_top_k"]).predict(texts)


def score_real_questions(config: dict, layout: Layout, labels: list[str], router, backbone: BackboneClassifier | None,
                         tokenizer, device: torch.device) -> dict:
    """Every method on the rows of ``evaluate.real_questions``: the ``metrics["real_questions"]`` dict."""
    path = Path(config["evaluate"]["real_questions"])
    texts, truth = read_real_questions(path, labels)
    probs_exit, exit_layer = router.predict(texts, early_exit=True, batch_size=EVAL_BATCH_SIZE)
    probs_full, _ = router.predict(texts, early_exit=False, batch_size=EVAL_BATCH_SIZE)
    predicted = {
        "router_early_exit": probs_exit.argmax(1),
        "router_full_depth": probs_full.argmax(1),
        "tfidf_logreg": tfidf_predictions(layout.split("train"), texts, config["seed"]),
    }
    if backbone is not None:  # None: trained on another expert set (backbone.rerun_on_dataset_change false)
        tokens = backbone_tokens(tokenizer, texts, truth, config["dataset"]["max_length"], str(path))
        predicted["backbone"] = classify(backbone, tokens, EVAL_BATCH_SIZE, device).argmax(1).numpy()
    exact = check_exit_exact(probs_exit, probs_full, f"real questions ({path})")
    retrieval = retrieval_predictions(config, layout, labels, texts)
    out = {"path": str(path), "rows": len(truth), **exact}
    out.update({name: classification_metrics(labels, truth, pred) for name, pred in predicted.items()})
    out.setdefault("backbone", None)
    out["router_early_exit"].update(exit_statistics(labels, truth, exit_layer, router.num_layers))
    out["agreement_early_exit_vs_full_depth"] = float((predicted["router_early_exit"]
                                                       == predicted["router_full_depth"]).mean())
    out["retrieval_routing"] = None if retrieval is None else classification_metrics(labels, truth, retrieval)
    out["mcnemar_vs_retrieval"] = None
    if retrieval is not None:
        out["mcnemar_vs_retrieval"] = {}
        for name in ("router_early_exit", "backbone", "tfidf_logreg"):
            if name not in predicted:
                continue
            test = mcnemar_exact(predicted[name] == truth, retrieval == truth)
            out["mcnemar_vs_retrieval"][name] = {"p_value": test["p_value"], "b": test["a_only"], "c": test["b_only"]}
    scored = ["router_early_exit", "router_full_depth", "backbone", "retrieval_routing", "tfidf_logreg"]
    log.info("evaluate: %d real questions (%s); accuracy %s", len(truth), path,
             ", ".join(f"{name} {'n/a' if out[name] is None else format(out[name]['accuracy'], '.4f')}"
                       for name in scored))
    return out


def evaluate(config: dict) -> dict:
    """Score (a) early exit, (b) full depth and (c) the backbone on every test row (and, with
    ``evaluate.real_questions``, every method on those rows); write the outputs, return the metrics."""
    from moegate.router import Router, write_model_card

    t0 = time.perf_counter()
    layout = Layout.from_config(config)
    labels = read_labels(layout)
    test = load_tokens(layout.tokens("test"))
    frame = pd.read_parquet(layout.split("test"), columns=["label", "query", "kind"])
    if len(frame) != len(test) or not np.array_equal(frame["label"].to_numpy(), test.labels.numpy()):
        raise ValueError(f"{layout.split('test')} ({len(frame)} rows) and {layout.tokens('test')} "
                         f"({len(test)} rows) disagree; rerun the dataset stage")
    truth = test.labels.numpy()

    router = Router.from_pretrained(layout.router, device=config["device"])
    if router.labels != labels:
        raise ValueError(f"{layout.router / 'config.json'}: labels {router.labels} differ from {layout.labels} "
                         f"{labels}; retrain the router on this dataset")
    n_layers = router.num_layers
    t = time.perf_counter()
    probs_exit, exit_layer = router.predict_tokens(test.input_ids, test.attention_mask, early_exit=True,
                                                   batch_size=EVAL_BATCH_SIZE)
    seconds_exit = time.perf_counter() - t
    t = time.perf_counter()
    probs_full, _ = router.predict_tokens(test.input_ids, test.attention_mask, early_exit=False,
                                          batch_size=EVAL_BATCH_SIZE)
    seconds_full = time.perf_counter() - t
    pred_exit, pred_full = probs_exit.argmax(1), probs_full.argmax(1)

    device = pick_device(config["device"])
    encoder, head, tokenizer, backbone_labels = load_backbone_classifier(layout.backbone)
    backbone, seconds_backbone, backbone_skipped = None, None, None
    systems = {
        "router_early_exit": classification_metrics(labels, truth, pred_exit),
        "router_full_depth": classification_metrics(labels, truth, pred_full),
        "backbone": None,
    }
    if backbone_labels == labels:
        backbone = BackboneClassifier(encoder, head).to(device)
        t = time.perf_counter()
        pred_backbone = classify(backbone, test, EVAL_BATCH_SIZE, device).argmax(1).numpy()
        seconds_backbone = round(time.perf_counter() - t, 3)
        systems["backbone"] = classification_metrics(labels, truth, pred_backbone)
    else:  # an expert was added or removed and backbone.rerun_on_dataset_change is false: no baseline to score
        # counted, not named: a removed expert leaves no trace in router/
        backbone_skipped = (f"{layout.backbone / 'labels.json'}: trained on another expert set ({len(backbone_labels)} "
                            f"experts, {len(set(backbone_labels) & set(labels))} of them this dataset's "
                            f"{len(labels)}); set backbone.rerun_on_dataset_change: true (or rerun train_backbone) "
                            "to score it")
        log.warning("evaluate: the backbone baseline is not scored: %s", backbone_skipped)
    agreement = float((pred_exit == pred_full).mean())
    exact = check_exit_exact(probs_exit, probs_full, "test rows")
    exits = exit_statistics(labels, truth, exit_layer, n_layers)
    exits["layer_classifier_accuracy"] = layer_accuracies(router.model, test, EVAL_BATCH_SIZE, router.device)
    metrics = {
        "labels": labels,
        "test_rows": len(truth),
        "router_early_exit": {**systems["router_early_exit"], **exits},
        "router_full_depth": systems["router_full_depth"],
        "backbone": systems["backbone"],
        **({"backbone_skipped": backbone_skipped} if backbone_skipped else {}),
        "agreement_early_exit_vs_full_depth": agreement,
        **exact,
        "accuracy_gap_vs_backbone": None if systems["backbone"] is None else
        systems["router_early_exit"]["accuracy"] - systems["backbone"]["accuracy"],
        "seconds": {"router_early_exit": round(seconds_exit, 3), "router_full_depth": round(seconds_full, 3),
                    "backbone": seconds_backbone, "device": str(device),
                    "threads": torch.get_num_threads(), "batch_size": EVAL_BATCH_SIZE},
        "ponder_cost": router.ponder_cost,
        "wall_seconds": 0.0,
    }
    in_domain = {"test": frame.loc[frame["kind"] == "question", "query"].astype(str).tolist()}
    if config["evaluate"]["real_questions"]:
        metrics["real_questions"] = score_real_questions(config, layout, labels, router, backbone, tokenizer, device)
        in_domain["real_questions"] = read_real_questions(config["evaluate"]["real_questions"], labels)[0]
    metrics["abstain"] = abstain_metrics(config, router, in_domain)
    plot_exit_layers(layout.evaluation / "exit_layers.png", labels, truth, exit_layer, n_layers)
    plot_confusions(layout.evaluation / "confusion.png", labels, {name: system for name, system in {
        "router (early exit)": systems["router_early_exit"], "router (full depth)": systems["router_full_depth"],
        "backbone classifier": systems["backbone"]}.items() if system is not None})
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 3)
    write_json(layout.router / "metrics.json", metrics)
    write_model_card(layout.router, metrics)  # the card's front matter carries the test metrics
    log.info("evaluate: %d test rows; accuracy early exit %.4f, full depth %.4f, backbone %s; "
             "mean exit layer %.2f of %d; agreement %.4f", len(truth), systems["router_early_exit"]["accuracy"],
             systems["router_full_depth"]["accuracy"],
             "n/a" if systems["backbone"] is None else f"{systems['backbone']['accuracy']:.4f}", exits["mean_layers"],
             n_layers, agreement)
    return metrics
