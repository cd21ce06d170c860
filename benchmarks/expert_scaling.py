"""How the router's cost and accuracy scale with the number of experts, against retrieval routing.

    python benchmarks/expert_scaling.py                     # sizes 3,5,8,10,13; ~20-30 min on 2 cores
    python benchmarks/expert_scaling.py --sizes 3,5 --time-limit-min 20

A script, not a test. For each size N it builds a router for the first N experts of ``--config``
(workflow/configs/scaling_cpu.yaml: the demo's three data-science courses, then the ten OpenStax books by
their number of real dev questions, most first; so each size is a superset of the one before) with the
real pipeline stages, called as module functions (what ``moegate dataset`` / ``states`` / ``train-router``
run), in a scratch results dir ``<workdir>/nNN/results`` (default workdir /tmp/expert_scaling):

- kb/, clusters/ and queries/ are symlinks to the finished runs' files (the demo's ``results/``, the
  OpenStax CPU run's ``results/openstax/``): nothing is ingested, clustered or synthesized again;
- ``results/cache/`` is one directory shared by every size (``<workdir>/cache``), so the dataset stage's
  KB-chunk and row embeddings and the states stage's per-layer states are computed once per row, as after
  an expert is added to a finished run (:mod:`moegate.rowcache`); the dataset+states times are therefore
  those of the rows the size adds (``states/report.json``: computed / reused), and a first size pays for
  its own;
- train_router runs from nothing for every size (``router.warm_start: null``) with one λ
  (``router.ponder_cost``, no sweep) and no tuning: its wall time is a full router training on that size.

Then, for each router, in one process and single-threaded (torch 1 thread):

- accuracy on the real dev questions restricted to the experts present: ``dsci_seed_dev.csv`` (the demo
  courses: always all 527) and ``mmlu_openstax_dev.csv`` (the books present), and both pooled; the router's
  expert is the early exit's argmax (no abstaining); retrieval routing (:class:`moegate.retrieval.
  RetrievalRouter`: the question embedded with ``encoder.model``, top-10 mean cosine per expert over
  every KB chunk of the experts present, ``dataset/kb_index.safetensors``) on the same rows;
- the mean exit layer on those questions;
- latency: the same ``--latency-questions`` questions (a fixed sample of both dev sets) one at a time,
  the methods interleaved question by question: ``Router.route(q)`` as shipped (it abstains on
  kb_similarity, which needs the last layer, so every question runs all layers), ``Router.predict([q])``
  (the early exit alone, no abstain score) and ``RetrievalRouter.predict([q])`` (embedding + dot products
  with every KB chunk + the per-expert top-10); p50/p99 in ms. Throughput: ``--throughput-batches``
  batches of 64 questions through each (``route(batch)``, ``predict(batch)``, retrieval), questions/s;
- router size: the bytes of the router directory (1 MB = 10^6 bytes).

Writes the tables to benchmarks/results/expert_scaling.md and the plot to benchmarks/results/
expert_scaling.png (``--out-md``, ``--out-png``). The scratch workdir is deleted at the start unless
``--keep-cache`` (then the shared row caches of a previous run are reused) and kept at the end (``--clean``
deletes it); ``--remeasure`` measures its routers again without building (e.g. after a busy machine spoiled
the timings). ``--time-limit-min``: no new size starts after that many minutes; the tables then hold the
sizes that finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEMO_RESULTS = REPO / "results"
OPENSTAX_RESULTS = REPO / "results" / "openstax"
DEV_SETS = {"dsci": SHARED / "questions" / "dsci_seed_dev.csv", "mmlu": SHARED / "questions" / "mmlu_openstax_dev.csv"}
BUILD_KEYS = ("experts", "added", "train_rows", "val_rows", "wall_dataset", "wall_states", "wall_train_router",
              "states_computed", "states_reused", "epochs_run", "best_epoch", "val_accuracy", "dataset_cache")
LINKED = (("kb", ".parquet"), ("kb", ".report.json"), ("clusters", ".parquet"), ("clusters", ".json"),
          ("queries", ".parquet"), ("queries", ".report.json"))

log = logging.getLogger("expert_scaling")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def source_results(expert: str) -> Path:
    """The finished run whose kb/, clusters/ and queries/ hold this expert's files."""
    for root in (DEMO_RESULTS, OPENSTAX_RESULTS):
        if all((root / d / f"{expert}{ext}").is_file() for d, ext in LINKED if ext == ".parquet"):
            return root
    sys.exit(f"{expert}: no finished kb/, clusters/ and queries/ files in {DEMO_RESULTS} or {OPENSTAX_RESULTS}")


def prepare(base: dict, experts: list[str], size_dir: Path, cache: Path) -> Path:
    """A scratch results dir with the experts' stage outputs linked and the shared cache; its config path."""
    import copy

    import yaml

    results = size_dir / "results"
    if size_dir.exists():
        shutil.rmtree(size_dir)
    for d in ("kb", "clusters", "queries"):
        (results / d).mkdir(parents=True)
    for expert in experts:
        root = source_results(expert)
        for d, ext in LINKED:
            src = root / d / f"{expert}{ext}"
            if src.is_file():
                os.symlink(src, results / d / f"{expert}{ext}")
    cache.mkdir(parents=True, exist_ok=True)
    os.symlink(cache, results / "cache")
    config = copy.deepcopy(base)
    config["results"] = str(results)
    config["experts"] = {e: {"source": str((REPO / base["experts"][e]["source"]).resolve())} for e in experts}
    path = size_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build(config_path: Path) -> tuple[dict, dict]:
    """dataset, states, train_router on the size's config: (config, wall seconds per stage)."""
    from moegate.config import load
    from moegate.dataset import dataset
    from moegate.states import states
    from moegate.train_router import train_router

    config = load(config_path)
    wall = {}
    for name, stage in (("dataset", dataset), ("states", states), ("train_router", train_router)):
        t = time.perf_counter()
        stage(config)
        wall[name] = time.perf_counter() - t
        log.info("%s: %s %.1f s", config_path.parent.name, name, wall[name])
    return config, wall


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def per_call_ms(fn, items) -> list[float]:
    out = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(config: dict, results: Path, dev, latency_texts: list[str], batches: list[list[str]]) -> dict:
    """Accuracy, exit layers, latency and throughput of this size's router and of retrieval routing."""
    import numpy as np

    from moegate.retrieval import KBIndex, RetrievalRouter
    from moegate.router import Router

    router = Router.from_pretrained(results / "router", device="cpu")
    index = KBIndex.load(results / "dataset" / "kb_index.safetensors")
    retrieval = RetrievalRouter(index, config, top_k=int(config["evaluate"]["retrieval_top_k"]))
    labels = router.labels
    assert index.labels == labels, (index.labels, labels)
    out: dict = {"kb_chunks": len(index), "router_bytes": dir_bytes(results / "router"),
                 "kb_similarity_rows": int((router.abstain or {}).get("kb_rows") or 0)}

    right = {"router": [], "retrieval": []}
    layers_all = []
    for name, frame in dev.items():
        part = frame[frame["expert"].isin(labels)]
        texts, gold = part["question"].astype(str).tolist(), part["expert"].to_numpy()
        out[f"n_{name}"] = len(part)
        if not len(part):
            continue
        probs, layers = router.predict(texts, early_exit=True, batch_size=64)
        r_ok = np.array(labels)[probs.argmax(1)] == gold
        q_ok = np.array(labels)[retrieval.predict(texts)] == gold
        out[f"router_{name}"], out[f"retrieval_{name}"] = float(r_ok.mean()), float(q_ok.mean())
        right["router"].append(r_ok)
        right["retrieval"].append(q_ok)
        layers_all.append(layers)
    for m in ("router", "retrieval"):
        out[f"{m}_pooled"] = float(np.concatenate(right[m]).mean())
    out["n_pooled"] = sum(len(r) for r in right["router"])
    out["mean_exit_layer"] = float(np.concatenate(layers_all).mean())
    out["num_layers"] = router.num_layers

    methods = {
        "route": lambda q: router.route(q),
        "early_exit": lambda q: router.predict([q]),
        "retrieval": lambda q: retrieval.predict([q]),
    }
    batch_methods = {
        "route": lambda b: router.route(b, batch_size=64),
        "early_exit": lambda b: router.predict(b, batch_size=64),
        "retrieval": lambda b: retrieval.predict(b),
    }
    for fn in methods.values():  # warm-up: first calls build caches, allocate
        per_call_ms(fn, latency_texts[:5])
    out["load_start"] = os.getloadavg()[0]
    times = {m: [] for m in methods}
    for q in latency_texts:  # interleaved, so load swings hit every method alike
        for m, fn in methods.items():
            times[m] += per_call_ms(fn, [q])
    for m, values in times.items():
        out[f"{m}_p50_ms"], out[f"{m}_p99_ms"] = statistics.median(values), pct(values, 0.99)
    for m, fn in batch_methods.items():
        fn(batches[0])
        t = time.perf_counter()
        for b in batches:
            fn(b)
        out[f"{m}_qps"] = sum(len(b) for b in batches) / (time.perf_counter() - t)
    out["load_end"] = os.getloadavg()[0]
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def tables(rows: list[dict]) -> tuple[str, str]:
    main = [
        "| experts | KB chunks | training rows | dev rows dsci / MMLU | router acc dsci | router acc MMLU | "
        "router acc pooled | retrieval acc dsci | retrieval acc MMLU | retrieval acc pooled | mean exit layer | "
        "router batch-1 p50 ms | retrieval batch-1 p50 ms | router batch-64 q/s | retrieval batch-64 q/s | "
        "train_router s | router MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        main.append(
            f"| {r['experts']} | {r['kb_chunks']:,} | {r['train_rows']:,} | {r['n_dsci']} / {r['n_mmlu']} | "
            f"{fmt(r.get('router_dsci'))} | {fmt(r.get('router_mmlu'))} | **{fmt(r['router_pooled'])}** | "
            f"{fmt(r.get('retrieval_dsci'))} | {fmt(r.get('retrieval_mmlu'))} | **{fmt(r['retrieval_pooled'])}** | "
            f"{r['mean_exit_layer']:.2f} of {r['num_layers']} | {r['route_p50_ms']:.1f} | {r['retrieval_p50_ms']:.1f} | "
            f"{r['route_qps']:.0f} | {r['retrieval_qps']:.0f} | {r['wall_train_router']:.0f} | "
            f"{r['router_bytes'] / 1e6:.1f} |")
    detail = [
        "| experts | added | val rows | epochs (best) | val acc | router early exit only: batch-1 p50 ms / "
        "batch-64 q/s | p99 ms: route / early exit / retrieval | kb_similarity rows | dataset s | states s | "
        "states computed / reused rows | load avg during timing |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        detail.append(
            f"| {r['experts']} | {', '.join(r['added'])} | {r['val_rows']:,} | {r['epochs_run']} ({r['best_epoch']}) | "
            f"{fmt(r['val_accuracy'])} | {r['early_exit_p50_ms']:.1f} / {r['early_exit_qps']:.0f} | "
            f"{r['route_p99_ms']:.1f} / {r['early_exit_p99_ms']:.1f} / {r['retrieval_p99_ms']:.1f} | "
            f"{r['kb_similarity_rows']:,} | {r['wall_dataset']:.0f} | {r['wall_states']:.0f} | "
            f"{r['states_computed']:,} / {r['states_reused']:,} | {r['load_start']:.2f} → {r['load_end']:.2f} |")
    return "\n".join(main), "\n".join(detail)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["experts"] for r in rows]
    fig, (acc, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc.plot(n, [r["router_pooled"] for r in rows], "o-", color="C0", label="router (pooled dev)")
    acc.plot(n, [r["retrieval_pooled"] for r in rows], "s--", color="C1", label="retrieval routing (pooled dev)")
    acc.plot(n, [r.get("router_dsci") for r in rows], "o:", color="C0", alpha=0.5, ms=3, label="router, dsci dev")
    acc.plot(n, [r.get("retrieval_dsci") for r in rows], "s:", color="C1", alpha=0.5, ms=3, label="retrieval, dsci dev")
    acc.set_xlabel("experts")
    acc.set_ylabel("accuracy on real dev questions")
    acc.set_xticks(n)
    acc.grid(alpha=0.3)
    acc.legend(fontsize=8)
    acc.set_title("accuracy (dev sets restricted to the experts present)", fontsize=9)
    lat.plot(n, [r["route_p50_ms"] for r in rows], "o-", color="C0", label="router route() (all layers + kb_similarity)")
    lat.plot(n, [r["early_exit_p50_ms"] for r in rows], "^-", color="C2", label="router early exit only")
    lat.plot(n, [r["retrieval_p50_ms"] for r in rows], "s--", color="C1", label="retrieval routing")
    lat.set_xlabel("experts (KB chunks)")
    lat.set_ylabel("batch-1 p50 latency, ms (1 CPU thread)")
    lat.set_xticks(n)
    lat.set_xticklabels([f"{r['experts']}\n({r['kb_chunks'] / 1000:.1f}k)" for r in rows])
    lat.set_ylim(bottom=0)
    lat.grid(alpha=0.3)
    lat.legend(fontsize=8)
    lat.set_title("cost per question", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "workflow" / "configs" / "scaling_cpu.yaml",
                        help="the run config; its experts in the order they are added")
    parser.add_argument("--sizes", default="3,5,8,10,13", help="numbers of experts (first N of --config)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/expert_scaling"), help="scratch results dirs")
    parser.add_argument("--keep-cache", action="store_true",
                        help="reuse <workdir>/cache (row caches) of a previous run instead of starting empty")
    parser.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    parser.add_argument("--remeasure", action="store_true",
                        help="build nothing: measure again the routers a previous run left in --workdir (its "
                             "rows.json gives the build numbers), e.g. when the machine was busy during timing")
    parser.add_argument("--latency-questions", type=int, default=200, help="batch-1 calls per method and size")
    parser.add_argument("--throughput-batches", type=int, default=4, help="batches of 64 per method and size")
    parser.add_argument("--time-limit-min", type=float, default=60.0, help="no new size starts after this")
    parser.add_argument("--out-md", type=Path, default=REPO / "benchmarks" / "results" / "expert_scaling.md")
    parser.add_argument("--out-png", type=Path, default=REPO / "benchmarks" / "results" / "expert_scaling.png")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pandas as pd
    import torch
    import yaml

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    base = yaml.safe_load(args.config.read_text())
    order = list(base["experts"])
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not sizes or sizes[0] < 2 or sizes[-1] > len(order):
        sys.exit(f"--sizes: each between 2 and {len(order)} (the experts of {args.config})")
    for path in DEV_SETS.values():
        if not path.is_file():
            sys.exit(f"{path}: missing (the shared data must be beside the checkout)")
    dev = {name: pd.read_csv(path) for name, path in DEV_SETS.items()}
    pooled = pd.concat(dev.values(), ignore_index=True)["question"].astype(str)
    latency_texts = pooled.sample(n=min(args.latency_questions, len(pooled)), random_state=0).tolist()
    throughput = pooled.sample(n=min(64 * args.throughput_batches, len(pooled)), random_state=1).tolist()
    batches = [throughput[i:i + 64] for i in range(0, len(throughput), 64)]

    built = {}
    if args.remeasure:
        built = {r["experts"]: r for r in json.loads((args.workdir / "rows.json").read_text())}
        sizes = [s for s in sizes if s in built]
        if not sizes:
            sys.exit(f"--remeasure: {args.workdir / 'rows.json'} has none of these sizes")
    elif args.workdir.exists() and not args.keep_cache:
        shutil.rmtree(args.workdir)
    cache = args.workdir / "cache"
    started, t_start = dt.datetime.now(), time.perf_counter()
    load_before = uptime()
    command = "python benchmarks/expert_scaling.py" + "".join(f" {a}" for a in sys.argv[1:])
    log.info("%s; %s", command, load_before)

    rows, previous = [], []
    skipped, failed = [], None
    for size in sizes:
        elapsed = (time.perf_counter() - t_start) / 60
        if elapsed > args.time_limit_min:
            skipped.append(size)
            log.warning("time limit: %.1f min elapsed, size %d not started", elapsed, size)
            continue
        experts = order[:size]
        size_dir = args.workdir / f"n{size:02d}"
        results = size_dir / "results"
        if args.remeasure:
            from moegate.config import load

            row = {k: v for k, v in built[size].items() if k in BUILD_KEYS}
            row.update(measure(load(size_dir / "config.yaml"), results, dev, latency_texts, batches))
            rows.append(row)
            log.info("size %d re-measured: %s", size, json.dumps(row, default=str))
            continue
        config_path = prepare(base, experts, size_dir, cache)
        log.info("size %d: %s", size, ", ".join(experts))
        try:
            config, wall = build(config_path)
        except Exception as e:  # a stage failed: keep the sizes that finished, stop here
            log.exception("size %d failed", size)
            failed = f"size {size}: {type(e).__name__}: {e}"
            break
        report = read_json(results / "dataset" / "report.json")
        st = read_json(results / "states" / "report.json")
        meta = read_json(results / "router" / "config.json").get("metadata", {})
        row = {"experts": size, "added": [e for e in experts if e not in previous],
               "train_rows": report["splits"]["train"]["rows"], "val_rows": report["splits"]["val"]["rows"],
               "wall_dataset": wall["dataset"], "wall_states": wall["states"],
               "wall_train_router": wall["train_router"],
               "states_computed": st.get("computed", 0), "states_reused": st.get("reused", 0),
               "epochs_run": meta.get("epochs_run"), "best_epoch": meta.get("best_epoch"),
               "val_accuracy": (meta.get("val") or {}).get("accuracy"),
               "dataset_cache": report.get("cache")}
        row.update(measure(config, results, dev, latency_texts, batches))
        rows.append(row)
        previous = experts
        (args.workdir / "rows.json").write_text(json.dumps(rows, indent=1, default=str))  # after every size
        log.info("size %d: %s", size, json.dumps({k: v for k, v in row.items() if k != "dataset_cache"}, default=str))
    load_after = uptime()
    wall_min = (time.perf_counter() - t_start) / 60
    if not rows:
        sys.exit("no size finished")

    main_table, detail_table = tables(rows)
    b = yaml.safe_load(args.config.read_text())
    ds, rt = b["dataset"], b["router"]
    book_order = ", ".join(order)
    lines = [
        f"# expert_scaling.py: routers for {', '.join(str(r['experts']) for r in rows)} experts vs retrieval routing "
        f"({started:%Y-%m-%d}, {os.cpu_count()}-core {platform.machine()} VM, no GPU, torch 1 thread)",
        "",
        f"    {command}",
        "",
        (f"Build numbers (training rows, stage times, epochs) from the earlier run in {args.workdir}; accuracy and "
         "timings measured again by this command. " if args.remeasure else "")
        + f"Wall time {wall_min:.1f} min. Machine load before: `{load_before}`; after: `{load_after}`"
        + (f". Sizes not started (time limit): {skipped}" if skipped else "")
        + (f". Stopped after a failure: {failed}" if failed else "") + ".",
        "",
        f"Code: commit {git('rev-parse', '--short', 'HEAD')}"
        + (f", with uncommitted changes to {git('status', '--porcelain', '--', 'src').replace(chr(10), ';')}"
           if git('status', '--porcelain', '--', 'src') else "") + ".",
        "",
        (f"Config `{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`; experts "
         f"added in this order: {book_order} (each size = the first N). Per expert: at most "
         f"{ds['max_train_rows_per_expert']} training questions (`dataset.max_train_rows_per_expert`) plus as many "
         f"KB windows (`kb_windows.max_share` {ds['kb_windows']['max_share']}); val {ds['val_fraction']} / test "
         f"{ds['test_fraction']} of each expert's questions (whole context groups). Frozen MiniLM, head "
         f"{rt['head']['classifier']} ({rt['head']['prototypes']} per expert and layer, top-{rt['head']['prototype_top_k']}), "
         f"last layer `{rt['head']['last_layer']}`, one λ = {rt['ponder_cost']} (no sweep), probe ≤ "
         f"{rt['probe']['epochs']} epochs (patience {rt['probe']['patience']}), no tuning, every router from nothing. "
         f"kb/, clusters/, queries/ linked from `results/` (demo) and `results/openstax/` (OpenStax CPU run); "
         f"scratch results dirs `{args.workdir}/nNN/results` sharing `{args.workdir}/cache`."),
        "",
        ("Accuracy: the early exit's expert (no abstaining) on `dsci_seed_dev.csv` (the 3 demo courses, in every "
         "size) and `mmlu_openstax_dev.csv` restricted to the books present; pooled = both. Retrieval routing = "
         "`moegate.retrieval.RetrievalRouter` (question embedded with MiniLM, top-10 mean cosine per expert over "
         "every KB chunk present). Latency: the same "
         f"{len(latency_texts)} dev questions one at a time, methods interleaved; router = `Router.route(q)` as "
         "shipped (abstains on kb_similarity, so every question runs all 6 layers); retrieval = embedding + dot "
         "products with every KB chunk + per-expert top-10. Throughput: "
         f"{len(batches)} batches of 64. train_router s = wall time of the train_router stage (one fit, no λ sweep, "
         "abstain calibration and saving included); dataset and states times are in the second table (incremental: "
         "the rows of the experts a size adds go through the encoder, the others come from the shared row "
         "caches). Router MB = bytes of `router/` (10^6)."),
        "",
        main_table,
        "",
        detail_table,
        "",
    ]
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        lines += [
            (f"From {first['experts']} to {last['experts']} experts (KB {first['kb_chunks']:,} → {last['kb_chunks']:,} "
             f"chunks): router batch-1 p50 {first['route_p50_ms']:.1f} → {last['route_p50_ms']:.1f} ms "
             f"(×{last['route_p50_ms'] / first['route_p50_ms']:.2f}; early exit only {first['early_exit_p50_ms']:.1f} → "
             f"{last['early_exit_p50_ms']:.1f}), retrieval {first['retrieval_p50_ms']:.1f} → "
             f"{last['retrieval_p50_ms']:.1f} ms (×{last['retrieval_p50_ms'] / first['retrieval_p50_ms']:.2f}); "
             f"batch-64 router {first['route_qps']:.0f} → {last['route_qps']:.0f} q/s, retrieval "
             f"{first['retrieval_qps']:.0f} → {last['retrieval_qps']:.0f} q/s; pooled accuracy router "
             f"{first['router_pooled']:.3f} → {last['router_pooled']:.3f}, retrieval {first['retrieval_pooled']:.3f} → "
             f"{last['retrieval_pooled']:.3f}."),
            "",
        ]
    lines.append(f"![accuracy and latency vs experts]({args.out_png.name})")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(text)
    plot(rows, args.out_png)
    (args.workdir / ("rows.remeasured.json" if args.remeasure else "rows.json")).write_text(
        json.dumps(rows, indent=1, default=str))
    print(f"wrote {args.out_md} and {args.out_png}; scratch in {args.workdir}"
          + (" (deleted)" if args.clean else f" (rows.json there)"))
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
