"""Stage evaluate: score the router on every test row, against itself at full depth and the backbone alone.

In: ``router/``, ``backbone/``, ``dataset/test.parquet`` + ``dataset/tokenized/test.safetensors``.
Out: ``router/metrics.json`` and ``evaluation/exit_layers.png``, ``evaluation/confusion.png``.

Three systems on the same rows: (a) the router with its per-sample early exit, (b) the same router
forced to run all N layers, (c) the fine-tuned backbone classifier. For each: accuracy, macro-F1,
per-expert recall and the confusion matrix; for (a) also the exit-layer histogram, the mean number of
layers run, and how often (a) and (b) pick the same expert — 1.0 by the exit rule's guarantee.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from moegate.encoder import device as pick_device
from moegate.io import save_figure, write_json
from moegate.layout import Layout
from moegate.train_backbone import BackboneClassifier, classify, load_backbone_classifier, read_labels
from moegate.training import load_tokens, to_device

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 64  # inference only: larger batches just cost memory


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


def evaluate(config: dict) -> dict:
    """Score (a) early exit, (b) full depth and (c) the backbone on every test row; write the outputs."""
    from moegate.router import Router

    t0 = time.perf_counter()
    layout = Layout.from_config(config)
    labels = read_labels(layout)
    test = load_tokens(layout.tokens("test"))
    frame = pd.read_parquet(layout.split("test"), columns=["label"])
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
    encoder, head, _, backbone_labels = load_backbone_classifier(layout.backbone)
    if backbone_labels != labels:
        raise ValueError(f"{layout.backbone / 'labels.json'}: labels {backbone_labels} differ from {labels}")
    backbone = BackboneClassifier(encoder, head).to(device)
    t = time.perf_counter()
    pred_backbone = classify(backbone, test, EVAL_BATCH_SIZE, device).argmax(1).numpy()
    seconds_backbone = time.perf_counter() - t

    systems = {
        "router_early_exit": classification_metrics(labels, truth, pred_exit),
        "router_full_depth": classification_metrics(labels, truth, pred_full),
        "backbone": classification_metrics(labels, truth, pred_backbone),
    }
    agreement = float((pred_exit == pred_full).mean())
    disagreements = int((pred_exit != pred_full).sum())
    if disagreements:  # the exit rule guarantees the full-depth answer: a mismatch is a bug to look at
        log.error("evaluate: early exit and full depth disagree on %d of %d test rows", disagreements, len(truth))
    exits = exit_statistics(labels, truth, exit_layer, n_layers)
    exits["layer_classifier_accuracy"] = layer_accuracies(router.model, test, EVAL_BATCH_SIZE, router.device)
    metrics = {
        "labels": labels,
        "test_rows": len(truth),
        "router_early_exit": {**systems["router_early_exit"], **exits},
        "router_full_depth": systems["router_full_depth"],
        "backbone": systems["backbone"],
        "agreement_early_exit_vs_full_depth": agreement,
        "disagreements": disagreements,
        "accuracy_gap_vs_backbone": systems["router_early_exit"]["accuracy"] - systems["backbone"]["accuracy"],
        "seconds": {"router_early_exit": round(seconds_exit, 3), "router_full_depth": round(seconds_full, 3),
                    "backbone": round(seconds_backbone, 3), "device": str(device),
                    "threads": torch.get_num_threads(), "batch_size": EVAL_BATCH_SIZE},
        "lambda_": router.lambda_,
        "wall_seconds": 0.0,
    }
    plot_exit_layers(layout.evaluation / "exit_layers.png", labels, truth, exit_layer, n_layers)
    plot_confusions(layout.evaluation / "confusion.png", labels, {
        "router (early exit)": systems["router_early_exit"], "router (full depth)": systems["router_full_depth"],
        "backbone classifier": systems["backbone"]})
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 3)
    write_json(layout.router / "metrics.json", metrics)
    log.info("evaluate: %d test rows; accuracy early exit %.4f, full depth %.4f, backbone %.4f; "
             "mean exit layer %.2f of %d; agreement %.4f", len(truth), systems["router_early_exit"]["accuracy"],
             systems["router_full_depth"]["accuracy"], systems["backbone"]["accuracy"], exits["mean_layers"],
             n_layers, agreement)
    return metrics
