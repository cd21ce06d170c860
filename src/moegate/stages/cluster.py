"""Stage 2, cluster: group one expert's chunks by topic (PCA → HDBSCAN → centroids mapped back).

In: ``kb/{expert}.parquet`` (id, text, embedding). PCA keeps ``cluster.pca_components`` components
(a count, or the fraction of variance to explain), HDBSCAN finds dense groups in that space, and the
noise policy decides what happens to the chunks HDBSCAN leaves out:

* ``drop``   — they leave the output;
* ``keep``   — they stay as cluster -1 (their own context group downstream);
* ``attach`` — each joins the cluster whose centroid (in PCA space) is nearest, with probability 0.

Out: ``clusters/{expert}.parquet`` (id, cluster, probability), ``clusters/{expert}.json`` (sizes, noise
before the policy, PCA dims and explained variance, parameters, per-cluster centroid mapped back to
the embedding space by ``pca.inverse_transform`` and the chunk nearest to it) and ``clusters/{expert}.png``
(the first two PCA components, coloured by cluster, HDBSCAN's noise grey).

Tiny experts (fewer chunks than min_cluster_size, even one) and runs where HDBSCAN finds only noise
give one cluster holding every chunk; the summary's ``fallback`` says which happened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moegate.errors import MoegateError
from moegate.io import save_figure, write_json, write_parquet
from moegate.layout import Layout

log = logging.getLogger(__name__)

NOISE = -1
CENTROID_DIMS_STORED = 64  # centroids of wider embeddings are summarised by norm, not stored whole


class ClusterError(MoegateError, ValueError):
    """The expert's KB cannot be clustered; the message names the file and what was expected."""


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def load_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings float64 [n, dim]) from a KB parquet; ClusterError if missing or malformed."""
    if not path.exists():
        raise ClusterError(f"{path}: missing (run `moegate ingest` for this expert first)")
    frame = pd.read_parquet(path, columns=None)
    missing = [c for c in ("id", "embedding") if c not in frame.columns]
    if missing:
        raise ClusterError(f"{path}: missing column(s) {', '.join(missing)} (expected id, text, embedding, source)")
    if frame.empty:
        raise ClusterError(f"{path}: no rows (ingest writes at least one; was the file replaced?)")
    dims = {len(v) for v in frame["embedding"]}
    if len(dims) != 1:
        raise ClusterError(f"{path}: embeddings of several dimensions {sorted(dims)} (expected one per expert)")
    return [str(i) for i in frame["id"]], np.stack(frame["embedding"].to_numpy()).astype(np.float64)


@dataclass
class Projection:
    """PCA of one expert's embeddings: coordinates and what it kept."""

    coords: np.ndarray  # [n, k]
    pca: object | None  # fitted sklearn PCA, None when the data allowed none (one row / no variance)
    requested: int | float
    explained: list[float]

    @property
    def n_components(self) -> int:
        return self.coords.shape[1]


def project(x: np.ndarray, components: float) -> Projection:
    """PCA to ``components``: an int count (clipped to n-1 and dim) or a float in (0, 1), the variance to keep.

    One row, or rows without any variance, cannot be projected: coordinates are zeros in 1 dim.
    """
    from sklearn.decomposition import PCA

    n, dim = x.shape
    if n < 2 or float(x.var(axis=0).sum()) <= 0.0:
        return Projection(np.zeros((n, 1)), None, components, [])
    if isinstance(components, float) and 0 < components < 1:
        pca = PCA(n_components=components, svd_solver="full")
    else:
        pca = PCA(n_components=max(1, min(int(components), n - 1, dim)), svd_solver="full")
    coords = pca.fit_transform(x)
    return Projection(coords, pca, components, [float(v) for v in pca.explained_variance_ratio_])


def hdbscan_labels(coords: np.ndarray, min_cluster_size: int, min_samples: int | None, metric: str,
                   selection: str = "eom") -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(labels, membership probabilities, persistence by label) from HDBSCAN on ``coords``.

    ``metric`` cosine is expected to have been handled by normalising before PCA (euclidean here).
    """
    import hdbscan

    model = hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        metric="manhattan" if metric == "manhattan" else "euclidean",
        cluster_selection_method=selection,
        core_dist_n_jobs=1,  # the reduced data is small; worker processes cost more than they save
    )
    labels = model.fit_predict(coords)
    persistence = {i: float(p) for i, p in enumerate(getattr(model, "cluster_persistence_", []))}
    return labels.astype(np.int64), model.probabilities_.astype(np.float64), persistence


def relabel_by_size(labels: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Renumber clusters 0..k-1 largest first (ties: lower old label first); noise stays -1."""
    found = [c for c in np.unique(labels) if c != NOISE]
    order = sorted(found, key=lambda c: (-int((labels == c).sum()), int(c)))
    mapping = {int(old): new for new, old in enumerate(order)}
    out = np.array([mapping.get(int(c), NOISE) for c in labels], dtype=np.int64)
    return out, mapping


def centroids(coords: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Mean PCA coordinates of each cluster (noise excluded)."""
    return {int(c): coords[labels == c].mean(axis=0) for c in np.unique(labels) if c != NOISE}


def attach_noise(coords: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    """Labels with every noise row moved to the cluster with the nearest centroid (in PCA space)."""
    cents = centroids(coords, labels)
    if not cents or not (labels == NOISE).any():
        return labels.copy()
    names = np.array(list(cents))
    matrix = np.stack([cents[c] for c in names])
    noise = labels == NOISE
    diff = coords[noise][:, None, :] - matrix[None, :, :]
    dist = np.abs(diff).sum(-1) if metric == "manhattan" else np.sqrt((diff**2).sum(-1))
    out = labels.copy()
    out[noise] = names[dist.argmin(axis=1)]
    return out


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def cluster(config: dict, expert: str) -> dict:
    """Cluster one expert's KB; write the assignments parquet, the summary JSON and the plot.

    Returns the summary (also written to ``clusters/{expert}.json``).
    """
    if expert not in config["experts"]:
        raise ClusterError(f"expert {expert!r} is not in config.experts (known: {', '.join(config['experts'])})")
    cfg = config["cluster"]
    layout = Layout.from_config(config)
    started = time.perf_counter()
    ids, x = load_embeddings(layout.kb(expert))
    n = len(ids)
    if cfg["metric"] == "cosine":  # on unit vectors euclidean distance ranks like cosine distance
        x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)

    proj = project(x, cfg["pca_components"])
    min_cluster_size = cfg["min_cluster_size"]
    min_samples = cfg["min_samples"] if cfg["min_samples"] is not None else min_cluster_size
    min_samples = max(1, min(min_samples, n - 1))  # HDBSCAN needs a neighbourhood the data can fill
    persistence: dict[int, float] = {}
    if n < min_cluster_size or proj.pca is None:
        fallback = "too_few_chunks" if n < min_cluster_size else "no_variance"
        raw, probability = np.zeros(n, dtype=np.int64), np.ones(n)
    else:
        raw, probability, persistence = hdbscan_labels(proj.coords, min_cluster_size, min_samples, cfg["metric"],
                                                      cfg["selection"])
        fallback = None
        if (raw == NOISE).all():
            fallback = "only_noise"
            raw, probability = np.zeros(n, dtype=np.int64), np.ones(n)
    found, mapping = relabel_by_size(raw)
    persistence = {mapping[old]: p for old, p in persistence.items() if old in mapping}
    noise = found == NOISE
    n_noise = int(noise.sum())

    policy = cfg["noise"]
    labels, probs, keep = found.copy(), probability.copy(), np.ones(n, dtype=bool)
    if policy == "drop":
        keep = ~noise
    elif policy == "attach":
        labels = attach_noise(proj.coords, found, cfg["metric"])
        probs[noise] = 0.0
    else:  # keep: noise is its own group, cluster -1
        probs[noise] = 0.0

    assignments = pd.DataFrame({
        "id": pd.Series([ids[i] for i in np.flatnonzero(keep)], dtype=object),
        "cluster": labels[keep].astype(np.int64),
        "probability": probs[keep].astype(np.float64),
    })
    summary = _summary(expert, ids, x, proj, found, labels, probs, keep, persistence, fallback, n_noise,
                       dict(cfg, min_samples_effective=min_samples))
    summary["seconds"] = round(time.perf_counter() - started, 3)

    write_parquet(layout.clusters(expert), assignments)
    write_json(layout.cluster_summary(expert), summary)
    save_figure(layout.cluster_plot(expert), scatter_plot(expert, proj, found, labels, summary))
    log.info("%s: %d chunks -> %d clusters, noise %d (%.0f%%, %s)%s", expert, n, summary["n_clusters"], n_noise,
             100 * summary["noise"]["share"], policy, f", fallback {fallback}" if fallback else "")
    return summary


def _summary(expert, ids, x, proj, found, labels, probs, keep, persistence, fallback, n_noise, cfg) -> dict:
    n, dim = x.shape
    kept_labels = labels[keep]
    groups = sorted(int(c) for c in np.unique(kept_labels))
    cents = centroids(proj.coords, labels)  # attached noise counts in the cluster it joined
    clusters = []
    for c in groups:
        members = keep & (labels == c)
        entry = {"cluster": c, "size": int(members.sum()),
                 "mean_probability": round(float(probs[members].mean()), 4)}
        if c != NOISE:
            entry["persistence"] = round(persistence.get(c, 0.0), 4) if persistence else None
            # the centroid mapped back to the embedding space, and the chunk that best stands for it
            centre = (proj.pca.inverse_transform(cents[c][None, :])[0] if proj.pca is not None
                      else x[members].mean(axis=0))
            rows = np.flatnonzero(members)
            sims = (x[rows] @ centre) / np.clip(np.linalg.norm(x[rows], axis=1) * np.linalg.norm(centre), 1e-12, None)
            entry["representative_id"] = ids[rows[int(sims.argmax())]]
            entry["centroid_norm"] = round(float(np.linalg.norm(centre)), 4)
            if dim <= CENTROID_DIMS_STORED:
                entry["centroid"] = [round(float(v), 6) for v in centre]
        clusters.append(entry)
    return {
        "expert": expert,
        "n_chunks": n,
        "n_clusters": sum(1 for c in groups if c != NOISE),
        "sizes": {str(e["cluster"]): e["size"] for e in clusters},
        "noise": {
            "count": n_noise,  # HDBSCAN's noise, before the policy
            "share": round(n_noise / n, 4),
            "policy": cfg["noise"],
            "dropped": int((~keep).sum()),
            "attached": n_noise if cfg["noise"] == "attach" and fallback is None else 0,
        },
        "fallback": fallback,
        "pca": {
            "requested": proj.requested,
            "input_dim": dim,
            "n_components": proj.n_components if proj.pca is not None else 0,
            "explained_variance_total": round(float(sum(proj.explained)), 4),
            "explained_variance_ratio": [round(v, 5) for v in proj.explained],
        },
        "params": {
            "min_cluster_size": cfg["min_cluster_size"],
            "min_samples": cfg["min_samples"],
            "min_samples_effective": cfg["min_samples_effective"],
            "metric": cfg["metric"],
            "selection": cfg["selection"],
            "noise": cfg["noise"],
        },
        "centroids_stored": dim <= CENTROID_DIMS_STORED,
        "clusters": clusters,
    }


def scatter_plot(expert: str, proj: Projection, found: np.ndarray, labels: np.ndarray, summary: dict):
    """A matplotlib Figure (no pyplot, no global backend): PC1 x PC2, one colour per cluster, noise grey."""
    from matplotlib.figure import Figure

    xy = proj.coords[:, :2] if proj.n_components >= 2 else np.column_stack([proj.coords[:, 0], np.zeros(len(found))])
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    cmap = _palette(summary["n_clusters"])
    noise = found == NOISE
    size = 14 if len(found) <= 500 else 5  # thousands of chunks: small points so clusters stay visible
    if noise.any():  # drawn first and faint, so the clusters show on top of it
        ax.scatter(xy[noise, 0], xy[noise, 1], s=size, color="0.65", marker="x", linewidths=0.6, alpha=0.5,
                   label=f"noise ({int(noise.sum())}, {summary['noise']['policy']})", zorder=1)
    for c in sorted(int(v) for v in np.unique(labels) if v != NOISE):
        members = (labels == c) & ~noise
        ax.scatter(xy[members, 0], xy[members, 1], s=size, color=cmap(c), label=f"{c} ({int(members.sum())})",
                   alpha=0.9, linewidths=0, zorder=2)
    ev = summary["pca"]["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of variance)" if ev else "PC1")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%} of variance)" if len(ev) > 1 else "PC2")
    ax.set_title(f"{expert}: {summary['n_chunks']} chunks, {summary['n_clusters']} clusters, "
                 f"noise {summary['noise']['share']:.0%}", fontsize=10)
    if summary["n_clusters"] <= 20:
        ax.legend(fontsize=7, markerscale=1.2, loc="best", ncols=2 if summary["n_clusters"] > 10 else 1)
    fig.tight_layout()
    return fig


def _palette(k: int):
    """Cluster colours without greys (grey means noise): tab10 for up to 9 clusters, else tab20; cycled."""
    from matplotlib import colormaps

    if k <= 9:
        colours = [colormaps["tab10"](i) for i in range(10) if i != 7]
    else:
        colours = [colormaps["tab20"](i) for i in range(20) if i not in (14, 15)]
    return lambda c: colours[c % len(colours)]
