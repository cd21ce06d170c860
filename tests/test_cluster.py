"""The cluster stage: PCA → HDBSCAN → noise policy, summary JSON and plot, on small synthetic KBs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import write_config
from sklearn.decomposition import PCA

from moegate.config import load
from moegate.io import write_parquet
from moegate.layout import Layout
from moegate.stages.cluster import ClusterError, attach_noise, cluster, project

DIM = 16
BLOB = 25
OUTLIERS = 6


def blobs(seed: int = 0) -> np.ndarray:
    """Three tight, well separated blobs of BLOB points in DIM dims, then OUTLIERS scattered far apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, DIM)) * 10
    parts = [centres[i] + rng.normal(size=(BLOB, DIM)) for i in range(3)]
    parts.append(rng.uniform(-40, 40, size=(OUTLIERS, DIM)))
    return np.concatenate(parts)


def make_run(tmp_path, vectors: np.ndarray, expert: str = "course", **cluster_cfg) -> dict:
    """A validated config whose results dir holds kb/{expert}.parquet with ``vectors``."""
    cfg = {"pca_components": 5, "min_cluster_size": 5, **cluster_cfg}
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load(write_config(tmp_path, cluster=cfg, experts={
        expert: {"source": "unused.jsonl"}, "other": {"source": "unused.jsonl"}}))
    n = len(vectors)
    write_parquet(Layout.from_config(config).kb(expert), pd.DataFrame({
        "id": [f"doc.md#{i}" for i in range(n)],
        "text": [f"chunk {i}" for i in range(n)],
        "embedding": list(np.asarray(vectors, dtype=np.float32)),
        "source": ["doc.md"] * n,
    }))
    return config


def outputs(config: dict, expert: str = "course") -> tuple[pd.DataFrame, dict]:
    layout = Layout.from_config(config)
    return pd.read_parquet(layout.clusters(expert)), json.loads(layout.cluster_summary(expert).read_text())


def test_outputs_and_summary(tmp_path):
    config = make_run(tmp_path, blobs(), noise="keep")
    returned = cluster(config, "course")
    frame, summary = outputs(config)
    assert returned == summary

    assert list(frame.columns) == ["id", "cluster", "probability"]
    assert frame["cluster"].dtype == np.int64 and frame["probability"].dtype == np.float64
    assert frame["id"].tolist() == [f"doc.md#{i}" for i in range(3 * BLOB + OUTLIERS)]
    # each blob is one cluster, numbered largest first; the scattered points are noise
    assert summary["n_clusters"] == 3 and summary["fallback"] is None
    for b in range(3):
        assert frame["cluster"].iloc[b * BLOB : (b + 1) * BLOB].nunique() == 1
    assert summary["noise"]["count"] >= OUTLIERS - 1
    assert summary["noise"]["share"] == round(summary["noise"]["count"] / len(frame), 4)
    assert sum(summary["sizes"].values()) == len(frame)
    assert summary["sizes"]["-1"] == summary["noise"]["count"]
    assert list(summary["sizes"]) == sorted(summary["sizes"], key=int)
    sizes = [summary["sizes"][str(c)] for c in range(3)]
    assert sizes == sorted(sizes, reverse=True)

    pca = summary["pca"]
    assert pca["input_dim"] == DIM and pca["n_components"] == 5 and len(pca["explained_variance_ratio"]) == 5
    assert pca["explained_variance_total"] == pytest.approx(sum(pca["explained_variance_ratio"]), abs=1e-3)
    assert 0.5 < pca["explained_variance_total"] <= 1.0
    assert summary["params"] == {"min_cluster_size": 5, "min_samples": None, "min_samples_effective": 5,
                                 "metric": "euclidean", "selection": "eom", "noise": "keep"}

    clusters = {c["cluster"]: c for c in summary["clusters"]}
    assert set(clusters) == {-1, 0, 1, 2}
    vectors = blobs()
    pca = PCA(n_components=5, svd_solver="full").fit(vectors)
    for c in range(3):
        members = frame.index[frame["cluster"] == c]
        # the centroid mapped back to embedding space (stored: DIM <= 64) is the blob mean seen through PCA
        mean = vectors[members].mean(axis=0, keepdims=True)
        np.testing.assert_allclose(clusters[c]["centroid"], pca.inverse_transform(pca.transform(mean))[0],
                                   atol=1e-3)
        assert clusters[c]["representative_id"] in set(frame.loc[members, "id"])
        assert 0 < clusters[c]["mean_probability"] <= 1
    assert summary["centroids_stored"] is True

    png = Layout.from_config(config).cluster_plot("course").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_noise_policies(tmp_path):
    vectors = blobs()
    results = {}
    for policy in ("keep", "drop", "attach"):
        config = make_run(tmp_path / policy, vectors, noise=policy)
        cluster(config, "course")
        results[policy] = outputs(config)
    keep, keep_summary = results["keep"]
    noise_ids = set(keep.loc[keep["cluster"] == -1, "id"])
    assert noise_ids and (keep.loc[keep["cluster"] == -1, "probability"] == 0).all()

    drop, drop_summary = results["drop"]
    assert set(drop["id"]) == set(keep["id"]) - noise_ids and (drop["cluster"] >= 0).all()
    assert drop_summary["noise"]["dropped"] == len(noise_ids) and "-1" not in drop_summary["sizes"]

    attach, attach_summary = results["attach"]
    assert len(attach) == len(keep) and (attach["cluster"] >= 0).all()
    attached = attach["id"].isin(noise_ids)
    assert (attach.loc[attached, "probability"] == 0).all()
    assert attach_summary["noise"]["attached"] == len(noise_ids)
    # members keep their clusters; only noise moved
    pd.testing.assert_series_equal(attach.loc[~attached, "cluster"], keep.loc[~attached, "cluster"])
    # every policy reports the same noise before it was applied
    assert keep_summary["noise"]["count"] == drop_summary["noise"]["count"] == attach_summary["noise"]["count"]


def test_attach_goes_to_the_nearest_centroid():
    coords = np.array([[0.0, 0], [0, 1], [10, 10], [10, 11], [1, 0.5], [9, 9], [-50, -50]])
    labels = np.array([0, 0, 1, 1, -1, -1, -1])
    assert attach_noise(coords, labels, "euclidean").tolist() == [0, 0, 1, 1, 0, 1, 0]
    assert attach_noise(coords, labels, "manhattan").tolist() == [0, 0, 1, 1, 0, 1, 0]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_tiny_expert_is_one_cluster(tmp_path, n):
    config = make_run(tmp_path, blobs()[:n], min_cluster_size=5)
    cluster(config, "course")
    frame, summary = outputs(config)
    assert frame["cluster"].tolist() == [0] * n and frame["probability"].tolist() == [1.0] * n
    assert summary["n_clusters"] == 1 and summary["fallback"] == "too_few_chunks"
    assert summary["sizes"] == {"0": n} and summary["noise"]["count"] == 0
    assert summary["pca"]["n_components"] == (0 if n == 1 else min(5, n - 1))
    assert Layout.from_config(config).cluster_plot("course").exists()


def test_only_noise_becomes_one_cluster(tmp_path):
    # twelve equidistant points (a scaled simplex): no density structure at all, HDBSCAN calls all noise
    config = make_run(tmp_path, np.eye(12, DIM) * 10, min_cluster_size=4, noise="drop")
    cluster(config, "course")
    frame, summary = outputs(config)
    assert summary["fallback"] == "only_noise" and summary["n_clusters"] == 1
    assert len(frame) == 12 and set(frame["cluster"]) == {0}
    assert summary["noise"]["count"] == 0 and summary["noise"]["dropped"] == 0


def test_identical_embeddings_are_one_cluster(tmp_path):
    config = make_run(tmp_path, np.ones((8, DIM)))
    cluster(config, "course")
    frame, summary = outputs(config)
    assert summary["fallback"] == "no_variance" and set(frame["cluster"]) == {0}


def test_pca_as_count_and_fraction():
    x = blobs()
    assert project(x, 3).n_components == 3
    assert project(x, 1000).n_components == DIM  # clipped to the embedding dimension
    assert project(x[:6], 1000).n_components == 5  # ... and to rows - 1
    half = project(x, 0.5)
    assert sum(half.explained) >= 0.5 and sum(half.explained[:-1]) < 0.5  # the fewest components reaching it
    assert project(x, 0.99).n_components > half.n_components


def test_fraction_and_cosine_in_the_stage(tmp_path):
    config = make_run(tmp_path, blobs(), pca_components=0.8, metric="cosine", min_samples=3)
    cluster(config, "course")
    frame, summary = outputs(config)
    assert summary["pca"]["requested"] == 0.8 and summary["pca"]["explained_variance_total"] >= 0.8
    assert summary["params"]["metric"] == "cosine" and summary["params"]["min_samples_effective"] == 3
    assert summary["n_clusters"] >= 3 and len(frame) == len(blobs())


def test_leaf_selection_finds_the_finer_clusters(tmp_path):
    # two groups of two sub-blobs each: eom keeps the two persistent groups, leaf the four sub-blobs
    rng = np.random.default_rng(1)
    centres = [np.r_[g * 60 + s * 7, np.zeros(DIM - 1)] for g in (0, 1) for s in (0, 1)]
    vectors = np.concatenate([c + rng.normal(size=(40, DIM)) for c in centres])
    found = {}
    for selection in ("eom", "leaf"):
        config = make_run(tmp_path / selection, vectors, min_cluster_size=8, selection=selection, noise="keep")
        found[selection] = cluster(config, "course")["n_clusters"]
    assert found == {"eom": 2, "leaf": 4}


def test_deterministic(tmp_path):
    vectors = blobs(seed=3)
    runs = []
    for k in range(2):
        config = make_run(tmp_path / str(k), vectors)
        cluster(config, "course")
        frame, summary = outputs(config)
        summary.pop("seconds")
        runs.append((frame, summary))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_missing_or_bad_kb_is_a_clear_error(tmp_path):
    config = load(write_config(tmp_path))
    with pytest.raises(ClusterError, match=r"kb/dsci_101.parquet: missing \(run `moegate ingest`"):
        cluster(config, "dsci_101")
    write_parquet(Layout.from_config(config).kb("dsci_101"),
                  pd.DataFrame({"id": ["a", "b"], "embedding": [np.zeros(3), np.zeros(4)]}))
    with pytest.raises(ClusterError, match=r"embeddings of several dimensions \[3, 4\]"):
        cluster(config, "dsci_101")
    with pytest.raises(ClusterError, match="'nobody' is not in config.experts"):
        cluster(config, "nobody")
