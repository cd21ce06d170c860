"""An expert added to a finished run (then removed again) vs the same run built from nothing.

    python benchmarks/incremental_update.py                        # ~1 h on 2 cores
    python benchmarks/incremental_update.py --workdir /tmp/incr --keep

A script, not a test. Four `snakemake --cores 2` runs of the shipped demo config (config.yaml), each in
its own work dir, with ``evaluate.real_questions`` = ``../shared/data/questions/dsci_seed_dev.csv`` and
``dataset.max_train_rows_per_expert`` = ``--cap`` (it caps only the new expert: the demo courses have
fewer training questions):

1. base: the demo's three courses from nothing (work dir ``incremental/``);
2. add: the OpenStax book ``--book`` (a folder of markdown, ingested with the demo's settings) added as
   a fourth expert in ``incremental/``: the incremental update (its `snakemake -n` job list recorded);
3. full: the same four experts from nothing in ``full/``: the rebuild the update replaces;
4. remove: the book removed again in ``incremental/``.

For each router: accuracy on the real dsci questions (overall and per course: the old experts), and
on the book's MMLU dev questions (``mmlu_openstax_dev.csv`` rows of that expert: the share routed to
it). Wall times are Snakemake's whole command; per-rule seconds come from the rules' benchmark files.
What rerunning the tuning studies would add to the update is read off the full run's tune_worker
jobs (plus train_router's λ sweep, the difference of its train_router time). Writes the tables to
``benchmarks/results/incremental_update.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent
DEMO_EXPERTS = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]


SHIPPED = yaml.safe_load((REPO / "config.yaml").read_text())  # read once: every run gets the same config


def write_config(workdir: Path, experts: list[str], book: str, book_source: Path, cap: int) -> None:
    config = copy.deepcopy(SHIPPED)
    sources = {e: {"source": str(REPO / config["experts"][e]["source"])} for e in DEMO_EXPERTS}
    sources[book] = {"source": str(book_source)}
    config["results"] = "results"
    config["experts"] = {e: sources[e] for e in experts}
    config["evaluate"]["real_questions"] = str(SHARED / "questions" / "dsci_seed_dev.csv")
    config["evaluate"]["off_topic_questions"] = [str(REPO / p) for p in config["evaluate"]["off_topic_questions"]]
    config["dataset"]["max_train_rows_per_expert"] = cap
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
                          cwd=workdir, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    (workdir / f"snakemake.{int(time.time())}.log").write_text(proc.stdout + proc.stderr)
    return proc, wall


def run(workdir: Path, name: str) -> float:
    print(f"[{dt.datetime.now():%H:%M:%S}] {name}: snakemake --cores 2 in {workdir}", flush=True)
    proc, wall = snakemake(workdir, "--cores", "2")
    if proc.returncode != 0:
        sys.exit(f"{name}: snakemake failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"[{dt.datetime.now():%H:%M:%S}] {name}: {wall / 60:.1f} min", flush=True)
    return wall


def plan(workdir: Path) -> dict[str, int]:
    """The `snakemake -n` job counts (rule → jobs)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_workflow import job_counts

    proc, _ = snakemake(workdir, "-n", "--cores", "2")
    if proc.returncode != 0:
        sys.exit(f"dry run failed:\n{proc.stderr[-4000:]}")
    return job_counts(proc.stdout + proc.stderr)


def rule_seconds(results: Path, since: float = 0.0) -> dict[str, float]:
    """Seconds per rule from the rules' benchmark files written after ``since`` (epoch seconds)."""
    out: dict[str, float] = {}
    for path in (results / "logs").rglob("*.benchmark.tsv"):
        if path.stat().st_mtime < since:
            continue
        rule = path.parent.name if path.parent.name != "logs" else path.name.split(".")[0]
        if rule == "tune":
            rule = "tune_worker " + path.name.split(".")[0]
        seconds = float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
        out[rule] = round(out.get(rule, 0.0) + seconds, 1)
    return out


def accuracy(router_dir: Path, book: str) -> dict:
    from moegate import Router

    router = Router.from_pretrained(router_dir, device="cpu")
    out = {"labels": router.labels}
    dsci = pd.read_csv(SHARED / "questions" / "dsci_seed_dev.csv")
    probs, _ = router.predict(dsci["question"].astype(str).tolist())
    routed = [router.labels[i] for i in probs.argmax(1)]
    right = dsci["expert"].to_numpy() == pd.Series(routed).to_numpy()
    out["dsci"] = round(float(right.mean()), 4)
    out["dsci_n"] = len(dsci)
    for e in DEMO_EXPERTS:
        rows = (dsci["expert"] == e).to_numpy()
        out[e] = round(float(right[rows].mean()), 4)
    out["dsci_to_book"] = int(sum(r == book for r in routed))
    # the same questions with the choice kept to the old experts: did their own rows degrade, or does the
    # new expert take questions that belong to them?
    old = [router.labels.index(e) for e in DEMO_EXPERTS]
    among_old = [DEMO_EXPERTS[i] for i in probs[:, old].argmax(1)]
    out["dsci_among_old"] = round(float((dsci["expert"].to_numpy() == pd.Series(among_old).to_numpy()).mean()), 4)
    mmlu = pd.read_csv(SHARED / "questions" / "mmlu_openstax_dev.csv")
    mmlu = mmlu[mmlu["expert"] == book]
    out["book_n"] = len(mmlu)
    if book in router.labels and len(mmlu):
        probs, _ = router.predict(mmlu["question"].astype(str).tolist())
        out["book"] = round(float((probs.argmax(1) == router.labels.index(book)).mean()), 4)
    else:
        out["book"] = None
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--book", default="statistics", help="the OpenStax book added as the fourth expert")
    parser.add_argument("--cap", type=int, default=300, help="dataset.max_train_rows_per_expert (caps the book)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "incremental_update.md")
    args = parser.parse_args()
    book_source = SHARED / "openstax" / args.book / "contents"
    for needed in (book_source, SHARED / "questions" / "dsci_seed_dev.csv", SHARED / "questions" / "mmlu_openstax_dev.csv"):
        if not needed.exists():
            sys.exit(f"{needed}: missing (the shared data must be beside the checkout)")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="incremental_update."))
    inc, full = root / "incremental", root / "full"
    three, four = DEMO_EXPERTS, [*DEMO_EXPERTS, args.book]
    started = dt.datetime.now()
    try:
        write_config(inc, three, args.book, book_source, args.cap)
        wall = {"base": run(inc, "base (3 experts from nothing)")}
        acc = {"base": accuracy(inc / "results" / "router", args.book)}

        write_config(inc, four, args.book, book_source, args.cap)
        plans = {"add": plan(inc)}
        t_add = time.time()
        wall["add"] = run(inc, f"add {args.book}")
        acc["add"] = accuracy(inc / "results" / "router", args.book)
        rules = {"add": rule_seconds(inc / "results", t_add)}
        reports = {"add": {"states": read(inc / "results" / "states" / "report.json"),
                           "dataset": read(inc / "results" / "dataset" / "report.json").get("cache"),
                           "warm_start": read(inc / "results" / "router" / "config.json")["metadata"]["warm_start"]}}

        write_config(full, four, args.book, book_source, args.cap)
        wall["full"] = run(full, "full rebuild (4 experts from nothing)")
        acc["full"] = accuracy(full / "results" / "router", args.book)
        rules["full"] = rule_seconds(full / "results")

        write_config(inc, three, args.book, book_source, args.cap)
        plans["remove"] = plan(inc)
        t_remove = time.time()
        wall["remove"] = run(inc, f"remove {args.book}")
        acc["remove"] = accuracy(inc / "results" / "router", args.book)
        rules["remove"] = rule_seconds(inc / "results", t_remove)
        reports["remove"] = {"states": read(inc / "results" / "states" / "report.json"),
                             "warm_start": read(inc / "results" / "router" / "config.json")["metadata"]["warm_start"]}
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    tune = {k: v for k, v in rules["full"].items() if k.startswith("tune_worker")}
    sweep = rules["full"].get("train_router", 0.0) - rules["add"].get("train_router", 0.0)
    lines = [
        (f"# incremental_update.py: {args.book} added to the demo, then removed ({started:%Y-%m-%d}, "
        f"{os.cpu_count()}-core {platform.machine()} VM, `snakemake --cores 2`)"),
        "",
        "    python benchmarks/incremental_update.py" + (f" --book {args.book}" if args.book != "statistics" else "")
        + (f" --cap {args.cap}" if args.cap != 300 else ""),
        "",
        (f"The shipped demo config (tuning budgets as shipped), `evaluate.real_questions` = dsci_seed_dev.csv, "
        f"`dataset.max_train_rows_per_expert: {args.cap}` (caps only the book). Wall = the whole `snakemake` "
        "command; accuracy = the router's early-exit expert on the real questions."),
        "",
        "| run | jobs (`snakemake -n`) | wall min | share of full rebuild | dsci acc (527) | "
        + " | ".join(DEMO_EXPERTS) + f" | {args.book} MMLU acc ({acc['base']['book_n']}) | dsci routed to {args.book} "
        "| dsci acc, choice among the old experts |",
        "|---|---|---:|---:|---:|" + "---:|" * len(DEMO_EXPERTS) + "---:|---:|---:|",
    ]
    jobs = {"add": plans["add"], "remove": plans["remove"]}
    for name, label in (("base", "base: 3 experts from nothing"), ("add", f"add {args.book} (incremental)"),
                        ("full", "full rebuild: 4 experts from nothing"), ("remove", f"remove {args.book} (incremental)")):
        a = acc[name]
        plan_text = ", ".join(f"{r} {n}" for r, n in jobs[name].items() if r != "all") if name in jobs else "all"
        share = wall[name] / wall["full"]
        lines.append(f"| {label} | {plan_text} | {wall[name] / 60:.1f} | {share:.0%} | {fmt(a['dsci'])} | "
                     + " | ".join(fmt(a[e]) for e in DEMO_EXPERTS)
                     + f" | {fmt(a['book'])} | {a['dsci_to_book']} | {fmt(a['dsci_among_old'])} |")
    lines += [
        "",
        (f"Old experts on the real dsci questions: {fmt(acc['base']['dsci'])} before, {fmt(acc['add']['dsci'])} "
        f"after the update ({100 * (acc['add']['dsci'] - acc['base']['dsci']):+.1f} points; the full rebuild "
        f"{fmt(acc['full']['dsci'])}), {fmt(acc['remove']['dsci'])} after the removal. Target: the update costs "
        f"≤ 25 % of a full rebuild ({wall['add'] / wall['full']:.0%}) and the old experts lose ≤ 1 point."),
        "",
        "Seconds per rule (the rules' benchmark files; cluster and the tune_create/collect jobs have none):",
        "",
        "| rule | add | remove | full rebuild |",
        "|---|---:|---:|---:|",
    ]
    for rule in sorted(set(rules["add"]) | set(rules["full"]) | set(rules["remove"])):
        lines.append(f"| {rule} | {rules['add'].get(rule, '')} | {rules['remove'].get(rule, '')} | "
                     f"{rules['full'].get(rule, '')} |")
    st_add, st_rm = reports["add"]["states"], reports["remove"]["states"]
    lines += [
        "",
        (f"Reuse: states {st_add.get('reused')} rows reused / {st_add.get('computed')} computed (add), "
        f"{st_rm.get('reused')} / {st_rm.get('computed')} (remove); dataset cache (add): "
        f"`{json.dumps(reports['add']['dataset'])}`; warm start (add): `{json.dumps(reports['add']['warm_start'])}`; "
        f"(remove): `{json.dumps(reports['remove']['warm_start'])}`."),
        "",
        (f"What tuning again for the new expert set would add to the update (`tuning.rerun_on_dataset_change: "
        f"true` and a new `tuning.study_prefix`: with the old prefix a rerun continues the finished studies and "
        f"runs no trial), read off the full rebuild's jobs: tune_worker {sum(tune.values()):.0f} s "
        f"({', '.join(f'{k.split()[-1]} {v:.0f} s' for k, v in sorted(tune.items()))}) plus about {max(sweep, 0):.0f} s "
        "of train_router's λ sweep (its time in the full rebuild minus the warm-started one's), plus the "
        "start of the 8 tune_create/collect jobs (no benchmark file); retraining the backbone baseline "
        f"(`backbone.rerun_on_dataset_change: true`) {rules['full'].get('train_backbone', 0):.0f} s."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}; runs in {root}" + ("" if args.keep or args.workdir else " (deleted)"))


if __name__ == "__main__":
    main()
