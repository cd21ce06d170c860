"""Adding or removing an expert in a finished run: the caches that keep old rows' work (rowcache), the
dataset's old rows left as they were, the states reused, the router warm-started from the previous one
(classifier rows matched by expert name), and the workflow planning and running exactly the jobs that
need to run (the last test, slow)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import DEMO, write_config
from test_dataset import write_queries
from test_workflow import job_counts, run_in

from moegate import Router, rowcache
from moegate.config import load
from moegate.layout import Layout
from moegate.stages.dataset import SPLITS, dataset
from moegate.stages.states import load_states, states
from moegate.stages.train_router import train_router

# -- rowcache ----------------------------------------------------------------------------------------


def test_keys_depend_on_the_text_and_on_the_attended_tokens_only():
    a, b = rowcache.text_keys(["a question", "another"]), rowcache.text_keys(["a question"])
    assert a.shape == (2, 16) and a.dtype == torch.uint8 and torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    ids = torch.tensor([[101, 7, 102, 0, 0], [101, 7, 102, 0, 0], [101, 8, 102, 0, 0]])
    mask = (ids != 0).long()
    keys = rowcache.token_keys(ids, mask)
    short = rowcache.token_keys(ids[:, :3], mask[:, :3])  # the same tokens padded less: the same key
    assert torch.equal(keys[0], keys[1]) and not torch.equal(keys[0], keys[2]) and torch.equal(keys, short)


def test_embed_with_cache_computes_only_new_texts_and_ignores_another_encoder(tmp_path):
    calls = []

    def compute(texts):
        calls.append(list(texts))
        return np.stack([np.full(3, len(t), dtype=np.float32) for t in texts])

    path = tmp_path / "rows.safetensors"
    meta = {"encoder": "e1", "max_length": 64}
    _, reused = rowcache.embed_with_cache(["a", "bb"], path, meta, compute)
    assert reused == 0 and calls == [["a", "bb"]]
    again, reused = rowcache.embed_with_cache(["ccc", "bb", "a"], path, meta, compute)
    assert reused == 2 and calls[-1] == ["ccc"]
    np.testing.assert_array_equal(again, np.array([[3] * 3, [2] * 3, [1] * 3], dtype=np.float32))
    _, reused = rowcache.embed_with_cache(["a"], path, {**meta, "encoder": "e2"}, compute)
    assert reused == 0 and calls[-1] == ["a"]  # another encoder: nothing reused


# -- the dataset: old experts' rows stay, the encoder runs on new text only ------------------------------
def _dataset_config(tmp_path: Path, experts: list[str]) -> dict:
    config = yaml.safe_load(write_config(  # a context a chunk, so windows and questions share context ids
        tmp_path, synthesize={"context_tokens": 60},
        dataset={"kb_windows": {"enabled": True, "words": 8, "stride": 4, "max_share": 0.5},
                 "teacher": {"enabled": True, "top_k": 2, "temperature": 0.05}}).read_text())
    config["experts"] = {e: config["experts"][e] for e in experts}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return load(tmp_path / "config.yaml")


def test_adding_an_expert_leaves_the_old_experts_rows_and_embeds_only_the_new_text(tmp_path):
    results = tmp_path / "results"
    shared = "Question 1 about pandas dataframes in context 4?"  # one of dsci_101's, asked by the new expert too
    for e, n in (("dsci_101", 12), ("dsci_dl_510", 15), ("dsci_vis_510", 9)):
        write_queries(results, e, contexts=n, extra=[shared] if e == "dsci_vis_510" else ())
    layout = Layout(results)
    before_report = dataset(_dataset_config(tmp_path, ["dsci_101", "dsci_dl_510"]))
    assert before_report["cache"]["row_embeddings"]["reused"] == 0
    before = {s: pd.read_parquet(layout.split(s)) for s in SPLITS}

    report = dataset(_dataset_config(tmp_path, ["dsci_101", "dsci_dl_510", "dsci_vis_510"]))
    after = {s: pd.read_parquet(layout.split(s)) for s in SPLITS}
    columns = ["query", "expert", "label", "context_id", "kind", "chunk"]
    assert report["dropped"]["ambiguous"] == 2  # the shared question, under both experts
    for s in SPLITS:  # the same rows of the old experts in the same split (the new expert's rows come after),
        # but for the question the new expert shares: its group's other rows stay where they were
        old = after[s][after[s]["expert"] != "dsci_vis_510"]
        kept = before[s][before[s]["query"] != shared]
        pd.testing.assert_frame_equal(old[columns].reset_index(drop=True), kept[columns].reset_index(drop=True))
        assert (after[s]["expert"] == "dsci_vis_510").any()
    kb = report["cache"]["kb_index"]
    assert kb["dsci_101"] == {"chunks": 12, "reused": 12} and kb["dsci_dl_510"] == {"chunks": 15, "reused": 15}
    assert kb["dsci_vis_510"] == {"chunks": 9, "reused": 0}
    rows = report["cache"]["row_embeddings"]
    assert rows["reused"] == before_report["rows_out"] - 1 and rows["rows"] == report["rows_out"]
    teacher = rowcache.read([layout.row_embeddings_cache], {}, "values")[1]
    assert teacher is not None and len(teacher) == report["rows_out"]

    # removing an expert again: its cached KB goes too
    assert layout.kb_vectors_cache("dsci_vis_510").is_file()
    report = dataset(_dataset_config(tmp_path, ["dsci_101", "dsci_dl_510"]))
    assert sorted(report["cache"]["kb_index"]) == ["dsci_101", "dsci_dl_510"]
    assert not layout.kb_vectors_cache("dsci_vis_510").exists() and layout.kb_vectors_cache("dsci_101").is_file()


# -- states: the last run's rows are not run through the encoder again -----------------------------------
def _frozen(config: dict, experts: list[str] | None = None, **router) -> dict:
    """``config`` (tiny_run's) as a frozen prototype router, on ``experts`` (rows of the others dropped)."""
    from moegate.stages.dataset import dataset as build

    config = copy.deepcopy(config)
    config["router"].update({"encoder_mode": "frozen", "ponder_cost_grid": [], **router})
    config["router"]["head"].update({"classifier": "prototypes", "prototypes": 4, "prototype_top_k": 2})
    config["router"]["probe"]["epochs"] = 2
    if experts is not None:
        config["experts"] = {e: config["experts"][e] for e in experts}
        config["dataset"]["drop_unknown_labels"] = True
        build(config)
    states(config)
    return config


def test_states_of_rows_seen_before_are_reused(tiny_run):
    config = _frozen(tiny_run)
    layout = Layout.from_config(config)
    first = json.loads((layout.states / "report.json").read_text())
    assert first["reused"] == 0 and first["computed"] == sum(v["rows"] for v in first["splits"].values())
    computed = {s: load_states(config, s).states for s in SPLITS}
    again = states(config)
    assert again["computed"] == 0 and again["reused"] == first["computed"]
    for s in SPLITS:
        torch.testing.assert_close(load_states(config, s).states, computed[s])
    # another pooling: other states, nothing reused
    other = copy.deepcopy(config)
    other["router"]["head"]["pooling"] = "cls" if config["router"]["head"]["pooling"] == "mean" else "mean"
    assert states(other)["reused"] == 0


# -- the router: warm-started from the previous one, rows matched by expert name --------------------------
def test_removing_then_adding_an_expert_warm_starts_the_router_by_expert_name(tiny_run):
    from safetensors.torch import load_file

    layout = Layout.from_config(tiny_run)
    three = list(tiny_run["experts"])
    config = _frozen(tiny_run)
    train_router(config)
    m = config["router"]["head"]["prototypes"]
    old = load_file(str(layout.router / "model.safetensors"))
    assert (layout.previous_router / "model.safetensors").samefile(layout.router / "model.safetensors")
    meta = json.loads((layout.router / "config.json").read_text())["metadata"]
    assert meta["warm_start"] == {"setting": "auto", "used": False, "why": "no previous router in this results dir"}

    # remove the middle expert: the others keep their rows of the previous router, nothing of it is left
    two = [three[0], three[2]]
    config2 = _frozen(tiny_run, experts=two)
    from moegate.stages.train_router import build_model
    from moegate.warm_start import carry_over, choose

    warm, record = choose(config2, two)
    assert record["used"] and warm.labels == three
    model, _ = build_model(config2, two)
    carried = carry_over(model, warm, two)
    assert carried == {"carried": two, "new": [], "new_index": [], "removed": 1}
    protos = model.state_dict()["classifiers.0.prototypes"]
    torch.testing.assert_close(protos[:m], old["classifiers.0.prototypes"][:m])
    torch.testing.assert_close(protos[m:], old["classifiers.0.prototypes"][2 * m:3 * m])
    torch.testing.assert_close(model.state_dict()["halting.1.0.weight"], old["halting.1.0.weight"])

    train_router(config2)
    text = (layout.router / "config.json").read_text()
    saved = json.loads(text)
    assert saved["labels"] == two and three[1] not in text and three[1] not in (layout.router / "README.md").read_text()
    assert saved["metadata"]["warm_start"]["used"] and saved["metadata"]["warm_start"]["removed"] == 1
    weights = load_file(str(layout.router / "model.safetensors"))
    assert weights["classifiers.0.prototypes"].shape[0] == 2 * m
    router = Router.from_pretrained(layout.router, device="cpu")
    assert router.labels == two and router.kb_index.labels == two
    assert {r.expert for r in router.route(["how does the chart relate to the axis?"], abstain_below=-1.0)} <= set(two)

    # add it back: carried rows for the two, k-means prototypes from its own rows for the returning one
    config3 = _frozen(tiny_run, experts=three)
    warm, record = choose(config3, three)
    assert record["used"] and warm.labels == two
    model, _ = build_model(config3, three)
    carried = carry_over(model, warm, three)
    assert carried["carried"] == two and carried["new"] == [three[1]] and carried["new_index"] == [1]
    summary = train_router(config3)
    meta = json.loads((layout.router / "config.json").read_text())["metadata"]
    assert meta["warm_start"]["new"] == [three[1]] and meta["warm_start"]["carried"] == two
    assert Router.from_pretrained(layout.router, device="cpu").labels == three and summary["epochs"] >= 1

    # the same expert set again trains from nothing (auto); null never warm-starts
    assert choose(config3, three)[1]["why"] == "the expert set did not change"
    assert choose({**config3, "router": {**config3["router"], "warm_start": None}}, two)[0] is None


def test_warm_start_needs_the_same_head_and_a_frozen_encoder(tiny_run):
    from moegate.warm_start import choose

    config = _frozen(tiny_run)
    train_router(config)
    two = list(tiny_run["experts"])[:2]
    other = _frozen(tiny_run, experts=two)
    other["router"]["head"]["prototype_top_k"] = 3
    warm, record = choose(other, two)
    assert warm is None and "head config differs (prototype_top_k)" in record["why"]
    other["router"]["head"]["prototype_top_k"] = 2
    other["router"]["encoder_mode"] = "lpft"
    warm, record = choose(other, two)
    assert warm is None and "warm start needs frozen" in record["why"]


# -- the workflow: the jobs `snakemake -n` plans after the config change, run for real --------------------
def _workflow_config(workdir: Path, tiny_model: Path, experts: list[str], **sections) -> None:
    """A tiny run's config.yaml in ``workdir``: the demo's first 24 chunks of each of ``experts``, the tiny
    random BERT as encoder and backbone; ``sections`` update the config's sections key by key."""
    sources = {}
    for name in experts:
        source = workdir / f"{name}.jsonl"
        if not source.exists():  # 24 chunks of a demo course (a fourth expert: the next 24 of the third)
            demo, start = ("dsci_vis_510", 24) if name == "dsci_extra" else (name, 0)
            lines = (DEMO / f"{demo}_data.jsonl").read_text().splitlines()[start:start + 24]
            source.write_text("\n".join(lines) + "\n")
        sources[name] = {"source": str(source)}
    tiny = str(tiny_model)
    config = {
        "device": "cpu",
        "experts": sources,
        "encoder": {"model": tiny, "max_length": 64},
        "cluster": {"min_cluster_size": 3},
        "synthesize": {"questions_per_context": 3, "context_tokens": 120},
        "dataset": {"max_length": 24, "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": {"model": tiny, "epochs": 1, "batch_size": 16},
        "router": {"head": {"classifier": "prototypes", "pooling": "mean", "prototypes": 4, "prototype_top_k": 2,
                            "last_layer": "kb"},  # the shipped head
                   "probe": {"epochs": 2},
                   "ponder_cost_grid": [0.0, 0.01]},
        "evaluate": {"off_topic_questions": []},
        "tuning": {"submodels": {"n_trials": 1}, "training": {"n_trials": 1}},
    }
    for key, values in sections.items():
        config[key] = {**config.get(key, {}), **values}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _plan(workdir: Path) -> dict[str, int]:
    run = run_in(workdir, "-n", "--cores", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    return job_counts(run.stdout + run.stderr)


def test_the_plan_after_an_expert_is_added_or_removed(tmp_path, tiny_bert_dir):
    """The DAG alone, on a run whose every output exists (``snakemake --touch``, so seconds): adding an
    expert plans its three KB jobs and dataset → states → train_router → evaluate; the rerun keys add the
    tuning jobs or the backbone classifier; removing one plans the last four."""
    experts = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]
    _workflow_config(tmp_path, tiny_bert_dir, experts)
    summary = run_in(tmp_path, "--summary")
    for line in summary.stdout.splitlines()[1:]:  # every output of the DAG, made empty
        path = tmp_path / line.split("\t")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    for _ in range(3):  # one --touch may leave a job without inputs (tune_create) newer than its consumers
        assert run_in(tmp_path, "--touch", "--cores", "1").returncode == 0
        if not _plan(tmp_path):
            break
    assert _plan(tmp_path) == {}

    update = {"all": 1, "dataset": 1, "states": 1, "train_router": 1, "evaluate": 1}
    four = [*experts, "dsci_extra"]
    new = {**update, "ingest": 1, "cluster": 1, "synthesize": 1}  # the new expert's
    _workflow_config(tmp_path, tiny_bert_dir, four)
    assert _plan(tmp_path) == new
    rerun = {"rerun_on_dataset_change": True}
    _workflow_config(tmp_path, tiny_bert_dir, four, tuning=rerun)  # the router's studies; the backbone's
    assert _plan(tmp_path) == {**new, "tune_worker": 3, "tune_collect": 2, "tune_lambda_collect": 1}  # with it
    _workflow_config(tmp_path, tiny_bert_dir, four, backbone=rerun)
    assert _plan(tmp_path) == {**new, "train_backbone": 1}
    _workflow_config(tmp_path, tiny_bert_dir, four, tuning=rerun, backbone=rerun)
    assert _plan(tmp_path) == {**new, "train_backbone": 1, "tune_worker": 4, "tune_collect": 3,
                               "tune_lambda_collect": 1}
    _workflow_config(tmp_path, tiny_bert_dir, [experts[0], experts[2]])
    assert _plan(tmp_path) == update


@pytest.mark.slow
def test_adding_then_removing_an_expert_reruns_only_its_jobs_and_warm_starts_the_router(tmp_path, tiny_bert_dir):
    """A finished 2-expert run (tiny random BERT for the encoder and backbone, 24 demo chunks an expert);
    a third expert added: `snakemake -n` plans its ingest, cluster and synthesize, then dataset, states,
    train_router, evaluate and nothing else; the run reuses the old rows' work and warm-starts the router;
    the expert removed again plans dataset, states, train_router and evaluate and leaves no trace of it."""
    experts = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]
    _workflow_config(tmp_path, tiny_bert_dir, experts[:2])
    run = run_in(tmp_path, "--cores", "2", timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = tmp_path / "results"
    first_tuning = {p.name: p.stat().st_mtime_ns for p in (results / "tuning").glob("*.json")}
    assert len(first_tuning) == 4

    _workflow_config(tmp_path, tiny_bert_dir, experts)
    plan = run_in(tmp_path, "-n", "--cores", "2")
    assert plan.returncode == 0, plan.stderr[-4000:]
    assert job_counts(plan.stdout + plan.stderr) == {
        "all": 1, "ingest": 1, "cluster": 1, "synthesize": 1, "dataset": 1, "states": 1, "train_router": 1,
        "evaluate": 1}, plan.stdout
    for rule in ("ingest", "cluster", "synthesize"):  # the new expert's, not the others'
        assert f"{rule}/dsci_vis_510.log" in plan.stdout and f"{rule}/dsci_101.log" not in plan.stdout
    run = run_in(tmp_path, "--cores", "2", timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in (results / "tuning").glob("*.json")} == first_tuning
    report = json.loads((results / "states" / "report.json").read_text())
    assert report["reused"] > 0 and report["computed"] > 0
    new_rows = sum(int((pd.read_parquet(results / "dataset" / f"{s}.parquet")["expert"] == "dsci_vis_510").sum())
                   for s in SPLITS)
    assert report["computed"] == new_rows  # only the new expert's rows went through the encoder
    kb = json.loads((results / "dataset" / "report.json").read_text())["cache"]["kb_index"]
    assert kb["dsci_101"]["reused"] == kb["dsci_101"]["chunks"] and kb["dsci_vis_510"]["reused"] == 0
    config = json.loads((results / "router" / "config.json").read_text())
    assert config["labels"] == experts and config["metadata"]["warm_start"]["used"]
    assert config["metadata"]["warm_start"]["new"] == ["dsci_vis_510"]
    metrics = json.loads((results / "router" / "metrics.json").read_text())
    assert metrics["labels"] == experts and metrics["backbone"] is None and "backbone_skipped" in metrics
    router = Router.from_pretrained(results / "router", device="cpu")
    assert router.labels == experts

    # remove one of the first two again
    seen = set().union(*(pd.read_parquet(results / "dataset" / f"{s}.parquet")["query"] for s in SPLITS))
    _workflow_config(tmp_path, tiny_bert_dir, [experts[0], experts[2]])
    plan = run_in(tmp_path, "-n", "--cores", "2")
    assert job_counts(plan.stdout + plan.stderr) == {"all": 1, "dataset": 1, "states": 1, "train_router": 1,
                                                    "evaluate": 1}, plan.stdout
    run = run_in(tmp_path, "--cores", "2", timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    # only rows the last run did not have: questions that were ambiguous with the removed expert's
    back = sum(int((~pd.read_parquet(results / "dataset" / f"{s}.parquet")["query"].isin(seen)).sum()) for s in SPLITS)
    assert json.loads((results / "states" / "report.json").read_text())["computed"] == back
    gone = "dsci_dl_510"
    router_dir = results / "router"
    for path in router_dir.rglob("*"):  # config.json, the card, metrics, training curves, kb_index, weights
        assert not path.is_file() or gone.encode() not in path.read_bytes(), path
    router = Router.from_pretrained(router_dir, device="cpu")
    assert router.labels == [experts[0], experts[2]] and router.kb_index.labels == router.labels
    m = router.model.head_config.prototypes
    assert router.model.classifiers[0].prototypes.shape[0] == 2 * m
    from moegate.retrieval import KBIndex

    assert KBIndex.load(results / "dataset" / "kb_index.safetensors").labels == router.labels
    assert json.loads((router_dir / "config.json").read_text())["metadata"]["warm_start"]["removed"] == 1
