"""Prove resume under faults: SIGKILL the whole Snakemake run at gated moments, recover, compare.

    python benchmarks/fault_sweep.py                    # every moment (14 kills), 40-60 min on 2 cores
    python benchmarks/fault_sweep.py --kills 4          # 4 moments spread over the DAG
    python benchmarks/fault_sweep.py --only states,evaluate --keep --workdir /tmp/fs

A script, not a test. Every run is the whole DAG (ingest → cluster → synthesize → dataset → states →
train_backbone / tune → train_router → evaluate) of a reduced demo config (:func:`reduced_config`) in
a fresh work dir, with the openai synthesize backend against the loopback stub LLM
(``tests/llm_stub.py``), which records every request. First an uninterrupted reference run, then an
uninterrupted control run (is the DAG deterministic at all?), then one run per moment: Snakemake is
started in its own process group, the script polls for the moment's observable sign of progress (a
log line, an output or checkpoint file, a RUNNING trial in the Optuna journal, a stub request) and
sends SIGKILL to the whole group at once. Then the README's recovery command (``snakemake --unlock``,
then ``snakemake --cores 2 --rerun-incomplete``, same config) runs to the end, and the script checks:

- metrics: ``router/metrics.json``, ``backbone/metrics.json``, the tuning studies' chosen params and
  best values, the points each study tried (params and values), the λ study's Pareto rows (or the
  router's λ sweep) and a digest of the router's and backbone's weights equal the reference's exactly (timings and resume counters
  left out). Exact, not within a tolerance: every stage is seeded, runs on the CPU with the thread
  count Snakemake gives its rule, and a resumed training loop restores the RNG state of its last
  checkpoint, so any difference is a finding.
- outputs: every output of a job that Snakemake had recorded as finished when the kill landed
  (``.snakemake/metadata`` record, no incomplete marker) keeps its size, mtime and sha256.
- Optuna (read with its API from the journal): no RUNNING or WAITING trial; COMPLETE trials = n_trials
  for every study with a budget.
- LLM cache: no request of the rerun is one whose reply was already cached (answered) when the rerun
  started; a request in flight at the kill (sent, reply not stored) may be asked again and is counted
  apart.

Prints the table and writes it with the sizes, wall times and per-kill notes to
``benchmarks/results/fault_sweep.md`` (``--out``). Exit status 1 when any kill fails a check.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

from llm_stub import StubLLM, questions_for_prompt

BIN = Path(sys.executable).parent
CODE_PARTS = ("Snakefile", "rules", "workflow", "envs", "src", "config.yaml", "data")
CODE = REPO  # where the runs take the workflow and moegate from: a snapshot of REPO (main sets it)
CODE_VERSION = "?"  # the checkout's commit and uncommitted changes when the snapshot was taken
CORES = 2
RUN_TIMEOUT_S = 1800  # one snakemake call; the reduced DAG takes 2-5 min
STUB_DELAY_S = 0.4  # per request: synthesize lasts long enough to be killed mid-requests
EXPERTS = ("dsci_101", "dsci_dl_510", "dsci_vis_510")

# The reduced demo: config.yaml with these changes (everything else as shipped).
SIZES = {
    "chunks_per_expert": 40,  # the first 40 chunks of each demo KB (114 / 132 / 60 in the demo)
    "synthesize.context_tokens": 700,  # demo 350: fewer, longer contexts
    "synthesize.questions_per_context": 3,  # demo 8
    "dataset.max_length": 32,  # demo 64
    "dataset.kb_windows.max_share": 0.4,  # demo 0.6
    "backbone.epochs": 2,  # demo 4: epoch 1's checkpoint exists while epoch 2 runs
    "router.probe.epochs": 8,  # demo 40 (patience 6)
    "router.ponder_cost_grid": [0.0, 0.01],  # demo 5 values
    "tuning.submodels.n_trials": 2,
    "tuning.training.n_trials": 2,
    "tuning.lambda.n_trials": 2,  # demo 0 (train_router sweeps λ instead)
}


def snapshot_code(root: Path, checkout: Path = REPO) -> Path:
    """A copy of the workflow, the package and the data, so edits to the checkout during a sweep (of an
    hour) cannot make one run differ from another; every run takes them from there."""
    code = root / "code"
    if code.exists():
        shutil.rmtree(code)
    code.mkdir(parents=True)
    for part in CODE_PARTS:
        src = checkout / part
        if src.is_dir():
            shutil.copytree(src, code / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, code / part)
    return code


def _absolute_paths(node, base: Path):
    """Relative paths in the config that name a file of the checkout, made absolute (runs use -d)."""
    if isinstance(node, dict):
        return {k: _absolute_paths(v, base) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute_paths(v, base) for v in node]
    if isinstance(node, str) and "/" in node and "://" not in node and not node.startswith("/") and \
            (base / node).exists():
        return str(base / node)
    return node


def reduced_config(workdir: Path, stub_url: str) -> dict:
    """config.yaml with SIZES applied, the experts' KBs cut to their first chunks (written under
    ``workdir/kb_sources``), the openai backend on the stub, CPU, results in ``workdir/results``."""
    config = yaml.safe_load((CODE / "config.yaml").read_text())
    config = _absolute_paths(copy.deepcopy(config), CODE)
    config["results"] = "results"
    config["device"] = "cpu"
    sources = workdir / "kb_sources"
    sources.mkdir(parents=True, exist_ok=True)
    for name, expert in config["experts"].items():
        lines = Path(expert["source"]).read_text().splitlines()[: SIZES["chunks_per_expert"]]
        (sources / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        expert["source"] = str(sources / f"{name}.jsonl")
    for key, value in SIZES.items():
        if "." in key:
            node = config
            *path, last = key.split(".")
            for part in path:
                node = node[part]
            node[last] = value
    config["router"]["probe"]["patience"] = SIZES["router.probe.epochs"]
    config["synthesize"]["backend"] = "openai"
    config["synthesize"]["openai"].update(model="stub-model", base_url=stub_url, concurrency=2, max_retries=1,
                                          max_wait_s=10, timeout_s=30)
    config["tuning"]["wait_s"] = 1
    config["evaluate"]["real_questions"] = None
    return config


def studies_with_budget(config: dict) -> dict[str, int]:
    return {s: config["tuning"][s]["n_trials"] for s in ("backbone", "submodels", "training", "lambda")
            if config["tuning"][s]["n_trials"] > 0}


# -- the stub LLM, recording who asked what and when ------------------------------------------------
class Recorder:
    """The stub's reply function: the default reply after STUB_DELAY_S, and a log of (phase, key, time)."""

    def __init__(self):
        from moegate.llm import request_key

        self._key = request_key
        self.lock = threading.Lock()
        self.phase = "idle"
        self.log: list[tuple[str, str, float]] = []

    def __call__(self, request: dict):
        with self.lock:
            self.log.append((self.phase, self._key(request), time.time()))
        reply = questions_for_prompt(request)
        reply.delay_s = STUB_DELAY_S
        return reply

    def keys(self, phase: str) -> list[str]:
        with self.lock:
            return [k for p, k, _ in self.log if p == phase]

    def count(self, phase: str, since: float = 0.0) -> int:
        with self.lock:
            return sum(p == phase and t >= since for p, _, t in self.log)


def cached_keys(workdir: Path) -> set[str]:
    root = workdir / "results" / "cache" / "llm"
    return {p.stem for p in root.glob("*/*.json")} if root.is_dir() else set()


# -- processes ----------------------------------------------------------------------------------------
def _proc_stat(pid: str) -> tuple[int, int, str] | None:
    """(ppid, pgrp, state) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), fields[0]


def live_processes() -> dict[int, tuple[int, int, str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(entry)) and stat[2] != "Z":
            out[int(entry)] = stat
    return out


def descendants(root: int) -> set[int]:
    procs = live_processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


def kill_tree(proc: subprocess.Popen) -> dict:
    """SIGKILL Snakemake's process group (it and every job it started) and wait until none is alive.

    Returns {"group": processes killed, "escaped": descendants outside the group, killed by PID}."""
    pgid = proc.pid
    tree = descendants(pgid) | {pgid}
    with_group = {pid for pid, (_, pgrp, _) in live_processes().items() if pgrp == pgid}
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    escaped = [pid for pid in tree - with_group if pid in live_processes()]
    for pid in escaped:  # a job that left the group (setsid) is still ours: its PID was in the tree
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = {pid for pid, (_, pgrp, _) in live_processes().items() if pgrp == pgid or pid in tree}
        if not alive:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"processes {sorted(alive)} of group {pgid} survived SIGKILL for 30 s")
    return {"group": len(with_group), "escaped": len(escaped)}


def snakemake_env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "sk-fault-sweep-stub",
            "PYTHONPATH": str(CODE / "src")}  # the jobs' moegate: the snapshot, before the editable install


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(CODE / "Snakefile"), "-d", str(workdir), *args]


FIRST_RUN = ("--cores", str(CORES))
RECOVERY = (("--unlock",), ("--cores", str(CORES), "--rerun-incomplete"))  # README: after a killed run


@dataclass
class RunResult:
    rc: int | None
    wall_s: float
    fired_at_s: float | None = None  # seconds after start when the gate fired (None: never)
    killed: dict | None = None
    timed_out: bool = False


def run_snakemake(workdir: Path, args: tuple[str, ...], log_name: str, gate: Callable[[], bool] | None = None,
                  poll_s: float = 0.05, active: list | None = None) -> RunResult:
    """One snakemake call in its own process group; with ``gate``, SIGKILL the group when it says so."""
    log = (workdir / f"{log_name}.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(snakemake_cmd(workdir, *args), cwd=workdir, env=snakemake_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if active is not None:
        active.append(proc)
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                return RunResult(rc, time.monotonic() - t0)
            if gate is not None and gate():
                fired = time.monotonic() - t0
                killed = kill_tree(proc)
                return RunResult(proc.returncode, time.monotonic() - t0, fired, killed)
            if time.monotonic() - t0 > RUN_TIMEOUT_S:
                killed = kill_tree(proc)
                return RunResult(proc.returncode, time.monotonic() - t0, None, killed, timed_out=True)
            time.sleep(poll_s)
    finally:
        log.close()
        if proc.poll() is None:
            kill_tree(proc)
        if active is not None:
            active.remove(proc)


# -- what Snakemake had finished, and whether it stayed untouched -------------------------------------
def finished_outputs(workdir: Path) -> dict[str, tuple[int, int, str]]:
    """{output path: (size, mtime_ns, sha256)} of every output Snakemake recorded as finished."""
    meta_root = workdir / ".snakemake" / "metadata"
    incomplete_root = workdir / ".snakemake" / "incomplete"
    incomplete = {_decode(p, incomplete_root) for p in incomplete_root.rglob("*") if p.is_file()} \
        if incomplete_root.is_dir() else set()
    out = {}
    for path in meta_root.rglob("*") if meta_root.is_dir() else []:
        if not path.is_file():
            continue
        target = _decode(path, meta_root)
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if record.get("incomplete") or target in incomplete:
            continue
        file = workdir / target
        if file.is_file():
            out[target] = file_state(file)
    return out


def _decode(path: Path, root: Path) -> str:
    """Snakemake's record name: urlsafe base64 of the output path, split into '@'-prefixed parts."""
    b64 = "".join(part.lstrip("@") for part in path.relative_to(root).parts)
    return base64.urlsafe_b64decode(b64.encode()).decode()


def file_state(path: Path) -> tuple[int, int, str]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def rewritten(before: dict[str, tuple], workdir: Path) -> list[str]:
    changed = []
    for target, state in sorted(before.items()):
        file = workdir / target
        if not file.is_file() or file_state(file) != state:
            changed.append(target)
    return changed


# -- Optuna --------------------------------------------------------------------------------------------
def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def journal_trials(workdir: Path, study: str) -> list | None:
    """The study's trials from the run's journal (Optuna's API), or None when it does not exist yet."""
    optuna = _quiet_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = workdir / "results" / "tuning" / "optuna.journal"
    if not path.is_file():
        return None
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    try:
        return optuna.load_study(study_name=f"moegate.results.{study}", storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return None


def study_check(workdir: Path, budgets: dict[str, int]) -> dict:
    """{running, waiting, exact, per_study: {study: {state: count}}} after a run."""
    from optuna.trial import TrialState

    per, running, waiting, exact = {}, 0, 0, True
    for study, n in budgets.items():
        trials = journal_trials(workdir, study) or []
        counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
        per[study] = counts
        running += counts.get("RUNNING", 0)
        waiting += counts.get("WAITING", 0)
        exact &= counts.get("COMPLETE", 0) == n
    return {"running": running, "waiting": waiting, "exact": exact, "per_study": per}


# -- the results compared with the reference ------------------------------------------------------------
VOLATILE = ("seconds", "wall", "resumed_from", "device", "threads", "duration", "datetime", "path", "storage",
            "released", "states", "trials", "retry_of", "worker")  # parts of a key
TRIAL_NUMBERS = ("trial", "number", "best_trial")  # whole keys: a re-run trial gets a new number


def comparable(obj, key: str = ""):
    """``obj`` without timings, resume counters and trial bookkeeping (they differ by design)."""
    if isinstance(obj, dict):
        return {k: comparable(v, k) for k, v in obj.items()
                if k not in TRIAL_NUMBERS and not any(w in k for w in VOLATILE)}
    if isinstance(obj, list):
        return [comparable(v, key) for v in obj]
    return obj


def final_results(workdir: Path) -> dict:
    results = workdir / "results"
    out = {}
    for name in ("router/metrics.json", "backbone/metrics.json", "tuning/submodels.json", "tuning/training.json",
                 "tuning/lambda.json", "tuning/backbone.json"):
        path = results / name
        out[name] = comparable(json.loads(path.read_text())) if path.is_file() else None
    training = results / "router" / "training.json"
    if training.is_file():
        sweep = json.loads(training.read_text()).get("lambda_sweep")
        out["router/training.json:lambda_sweep"] = comparable(sweep) if sweep else None
    for study in ("backbone", "submodels", "training", "lambda"):
        path = results / "tuning" / f"{study}.json"
        if path.is_file():  # the points the study tried, not only its best: a resumed study is the same study
            trials = json.loads(path.read_text()).get("trials", [])
            out[f"tuning/{study}.json:trials"] = sorted(
                json.dumps({k: t.get(k) for k in ("state", "params", "values")}, sort_keys=True)
                for t in trials if t.get("state") in ("COMPLETE", "PRUNED"))
    for name in ("router/model.safetensors", "backbone/model.safetensors", "backbone/classifier.safetensors"):
        path = results / name  # the weights themselves: a resumed training must end bit for bit where the reference did
        out[f"weights {name}"] = tensors_digest(path) if path.is_file() else None
    csv = results / "tuning" / "lambda_pareto.csv"
    out["tuning/lambda_pareto.csv"] = _pareto_rows(csv) if csv.is_file() else None
    return out


def tensors_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensors (name, dtype, shape, bytes) and metadata, in sorted order.

    Not the file's own hash: safetensors writes the metadata map in no fixed order."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _pareto_rows(path: Path) -> list[dict]:
    """The λ study's rows without trial numbers (a re-run trial gets a new number), in a stable order."""
    import pandas as pd

    table = pd.read_csv(path).drop(columns=["trial"])
    return sorted(table.to_dict("records"), key=lambda r: json.dumps(r, sort_keys=True, default=str))


def differences(ref, got, where: str = "") -> list[str]:
    if where.endswith(":trials") and isinstance(ref, list) and isinstance(got, list):
        only_ref, only_got = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        if not (only_ref or only_got):
            return []
        return [f"{where}: only the reference tried {_trials(only_ref)}; only this run tried {_trials(only_got)}"]
    if isinstance(ref, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(ref) | set(got)):
            out += differences(ref.get(k, "<missing>"), got.get(k, "<missing>"), f"{where}.{k}" if where else k)
        return out
    if isinstance(ref, list) and isinstance(got, list) and len(ref) == len(got):
        out = []
        for i, (a, b) in enumerate(zip(ref, got)):
            out += differences(a, b, f"{where}[{i}]")
        return out
    return [] if ref == got else [f"{where}: {_short(ref)} vs {_short(got)}"]


def _trials(rows: list[str]) -> str:
    def one(row: str) -> str:
        t = json.loads(row)
        params = ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                           for k, v in t["params"].items())
        values = "/".join(f"{v:.4g}" for v in t["values"] or [])
        return f"({params}) → {values}"

    return "; ".join(one(r) for r in rows) or "nothing else"


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) < 60 else text[:57] + "..."


# -- the moments ---------------------------------------------------------------------------------------
@dataclass
class Probe:
    """What a gate may look at during one run."""

    workdir: Path
    recorder: Recorder
    phase: str
    memo: dict = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.workdir / "results" / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def log(self, rel: str) -> str:
        try:
            return self.path(f"logs/{rel}").read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Moment:
    name: str
    stage: str
    moment: str
    gated_by: str
    gate: Callable[[Probe], bool]
    poll_s: float = 0.05


def _expert_started(p: Probe, stage: str, done: str) -> bool:
    return any(p.exists(f"logs/{stage}/{e}.log") and not p.exists(done.format(e=e)) for e in EXPERTS)


def _synth_mid_requests(p: Probe) -> bool:
    if any(p.exists(f"queries/{e}.parquet") for e in EXPERTS):
        return False
    return len(cached_keys(p.workdir)) >= 3


def _synth_second_expert(p: Probe) -> bool:
    done = [e for e in EXPERTS if p.exists(f"queries/{e}.parquet")]
    if not done:
        return False
    first = p.memo.setdefault("first_done_at", time.time())
    pending = [e for e in EXPERTS if e not in done and p.exists(f"logs/synthesize/{e}.log")]
    return bool(pending) and p.recorder.count(p.phase, since=first) >= 2 and len(done) < len(EXPERTS)


def _running_trial(study: str, number: int) -> Callable[[Probe], bool]:
    def gate(p: Probe) -> bool:
        if not p.exists(f"logs/tune/{study}.worker0.log") or p.exists(f"tuning/{study}/worker0.done"):
            return False
        from optuna.trial import TrialState

        trials = journal_trials(p.workdir, study) or []
        return any(t.number == number and t.state == TrialState.RUNNING and t.intermediate_values for t in trials)

    return gate


def _final_fit_epoch(p: Probe) -> bool:
    text = p.log("train_router.log")
    if "λ sweep chose" in text:  # λ sweep ran (no λ study): its last line comes before the final fit
        tail = text.split("λ sweep chose", 1)[1]
    elif "router: tuned values" in text:
        tail = text.split("router: tuned values", 1)[1]
    else:
        return False
    return tail.count("router probe epoch") >= 2 and not p.exists("router/config.json")


MOMENTS = [
    Moment("ingest", "ingest", "ingest job started, KB parquet not written",
           "logs/ingest/E.log exists, kb/E.parquet does not",
           lambda p: _expert_started(p, "ingest", "kb/{e}.parquet")),
    Moment("cluster", "cluster", "cluster job started, summary not written",
           "logs/cluster/E.log exists, clusters/E.json does not",
           lambda p: _expert_started(p, "cluster", "clusters/{e}.json")),
    Moment("synthesize", "synthesize", "mid-requests, no expert done",
           ">= 3 replies in cache/llm, no queries/*.parquet", _synth_mid_requests),
    Moment("synthesize-2", "synthesize", "one expert done, another mid-requests",
           "a queries/E.parquet exists, >= 2 stub requests since, another expert pending", _synth_second_expert),
    Moment("dataset", "dataset", "building the retrieval index (teacher)",
           "dataset.log has 'retrieval index: embedding', dataset/report.json absent",
           lambda p: "retrieval index: embedding" in p.log("dataset.log") and not p.exists("dataset/report.json")),
    Moment("states", "states", "encoder loaded, computing per-layer states",
           "states.log has 'Loading weights', states/report.json absent",
           lambda p: "Loading weights" in p.log("states.log") and not p.exists("states/report.json")),
    Moment("tune-submodels", "tune_worker", "mid-trial, the study's last trial (#1)",
           "journal: submodels trial 1 RUNNING with an intermediate value", _running_trial("submodels", 1), 0.2),
    Moment("tune-training", "tune_worker", "mid-trial, the study's first trial (#0)",
           "journal: training trial 0 RUNNING with an intermediate value", _running_trial("training", 0), 0.2),
    Moment("tune-collect", "tune_collect", "between a worker's .done and its collect",
           "tuning/submodels/worker0.done exists, tuning/submodels.json absent",
           lambda p: p.exists("tuning/submodels/worker0.done") and not p.exists("tuning/submodels.json")),
    Moment("tune-lambda", "tune_worker", "mid-trial of the two-objective λ study (#0)",
           "journal: lambda trial 0 RUNNING", lambda p: _running_lambda(p), 0.2),
    Moment("train_backbone", "train_backbone", "mid-epoch 2, after epoch 1's checkpoint",
           "checkpoints/backbone/checkpoint.pt exists, backbone/metrics.json absent",
           lambda p: p.exists("checkpoints/backbone/checkpoint.pt") and not p.exists("backbone/metrics.json")),
    Moment("train_router", "train_router", "final fit, after its 2nd probe epoch",
           "train_router.log: >= 2 'router probe epoch' lines of the final fit, router/config.json absent",
           _final_fit_epoch),
    Moment("evaluate", "evaluate", "router loaded, scoring",
           "evaluate.log has 'loaded router', router/metrics.json absent",
           lambda p: "loaded router" in p.log("evaluate.log") and not p.exists("router/metrics.json")),
    Moment("end", "evaluate", "metrics.json just written, before Snakemake records the job",
           "router/metrics.json exists", lambda p: p.exists("router/metrics.json"), 0.01),
]


def _running_lambda(p: Probe) -> bool:
    if not p.exists("logs/tune/lambda.worker0.log") or p.exists("tuning/lambda/worker0.done"):
        return False
    from optuna.trial import TrialState

    trials = journal_trials(p.workdir, "lambda") or []
    # two objectives report no intermediate values: wait for the trial's first probe epoch in the log
    return any(t.number == 0 and t.state == TrialState.RUNNING for t in trials) and \
        "router probe epoch" in p.log("tune/lambda.worker0.log")


def pick(moments: list[Moment], kills: int | None, only: list[str] | None) -> list[Moment]:
    if only:
        names = {m.name for m in moments}
        unknown = [n for n in only if n not in names]
        if unknown:
            sys.exit(f"--only: unknown moment(s) {unknown}; known: {', '.join(sorted(names))}")
        return [m for m in moments if m.name in only]
    if kills is None or kills >= len(moments):
        return list(moments)
    if kills <= 1:
        return moments[:kills]
    step = (len(moments) - 1) / (kills - 1)  # spread over the DAG
    return [moments[round(i * step)] for i in range(kills)]


# -- one scenario ---------------------------------------------------------------------------------------
@dataclass
class Row:
    number: str
    moment: Moment | None
    fired: bool = True
    landed: str = ""
    kill_s: float | None = None
    run_wall_s: float = 0.0
    unlock_rc: int | None = None
    rerun_rc: int | None = None
    rerun_wall_s: float = 0.0
    diffs: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    finished_at_kill: int = 0
    studies: dict = field(default_factory=dict)
    repeated: int = 0
    reasked_in_flight: int = 0
    requests: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.fired and self.rerun_rc == 0 and not self.diffs and not self.rewritten
                and self.studies.get("running", 1) == 0 and self.studies.get("waiting", 1) == 0
                and self.studies.get("exact", False) and self.repeated == 0)


def setup_workdir(root: Path, name: str, stub_url: str) -> tuple[Path, dict]:
    workdir = root / name
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config = reduced_config(workdir, stub_url)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir, config


def scenario(root: Path, number: str, moment: Moment | None, stub_url: str, recorder: Recorder,
             reference: dict | None, active: list) -> tuple[Row, Path]:
    workdir, config = setup_workdir(root, number if moment is None else f"kill{number}-{moment.name}", stub_url)
    row = Row(number, moment)
    phase_run, phase_rerun = f"{number}:run", f"{number}:rerun"
    recorder.phase = phase_run
    probe = Probe(workdir, recorder, phase_run)
    gate = (lambda: moment.gate(probe)) if moment else None
    first = run_snakemake(workdir, FIRST_RUN, "snakemake.run", gate, moment.poll_s if moment else 0.05, active)
    row.run_wall_s = first.wall_s
    if first.timed_out:
        row.notes.append(f"first run timed out after {RUN_TIMEOUT_S} s")
    if moment is None:
        row.rerun_rc = first.rc
        recorder.phase = "idle"
    else:
        row.fired = first.fired_at_s is not None
        row.kill_s = first.fired_at_s
        if not row.fired:
            row.notes.append(f"gate never fired: the run ended (rc {first.rc}) before '{moment.gated_by}'")
        else:
            row.notes.append(f"killed {first.killed['group']} processes in the group"
                             + (f", {first.killed['escaped']} outside it" if first.killed["escaped"] else ""))
        row.landed = landed(moment, workdir)
        before = finished_outputs(workdir)
        row.finished_at_kill = len(before)
        cached_before = cached_keys(workdir)
        recorder.phase = phase_rerun
        unlock = run_snakemake(workdir, RECOVERY[0], "snakemake.unlock", active=active)
        rerun = run_snakemake(workdir, RECOVERY[1], "snakemake.rerun", active=active)
        recorder.phase = "idle"
        row.unlock_rc, row.rerun_rc, row.rerun_wall_s = unlock.rc, rerun.rc, rerun.wall_s
        if rerun.rc != 0:
            tail = (workdir / "snakemake.rerun.log").read_text(errors="replace").splitlines()[-15:]
            row.notes.append("rerun failed: " + " | ".join(line.strip() for line in tail if line.strip())[-600:])
        row.rewritten = rewritten(before, workdir)
        asked_run, asked_rerun = recorder.keys(phase_run), recorder.keys(phase_rerun)
        row.requests = (len(asked_run), len(asked_rerun))
        row.repeated = sum(k in cached_before for k in asked_rerun)
        row.reasked_in_flight = sum(k in set(asked_run) and k not in cached_before for k in asked_rerun)
        dupes = len(asked_run) - len(set(asked_run))
        if dupes:
            row.notes.append(f"{dupes} requests repeated within the first run")
        row.notes += recovery_evidence(workdir)
    row.studies = study_check(workdir, studies_with_budget(config))
    if reference is not None and row.rerun_rc == 0:
        row.diffs = differences(reference, final_results(workdir))
    return row, workdir


def recovery_evidence(workdir: Path) -> list[str]:
    """What the rerun's own logs and reports say it recovered: a training resumed from its checkpoint, a
    stale trial failed and re-queued, cached LLM replies reused."""
    found = []
    logs = workdir / "results" / "logs"
    for log in sorted(logs.rglob("*.log")) if logs.is_dir() else []:
        for line in log.read_text(errors="replace").splitlines():
            for marker in ("resuming after epoch", "is stale"):
                if marker in line:
                    found.append(f"{log.relative_to(logs)}: " + line.split(": ", 1)[-1].strip()[:160])
    for report in sorted((workdir / "results" / "queries").glob("*.report.json")):
        hits = json.loads(report.read_text()).get("cache", {}).get("hits", 0)
        if hits:
            found.append(f"synthesize {report.name.split('.')[0]}: {hits} replies from the cache")
    return found


def landed(moment: Moment, workdir: Path) -> str:
    """Where the kill landed: the outputs Snakemake had marked incomplete (jobs running), shortened."""
    incomplete_root = workdir / ".snakemake" / "incomplete"
    marked = sorted(_decode(p, incomplete_root).removeprefix("results/") for p in incomplete_root.rglob("*")
                    if p.is_file()) if incomplete_root.is_dir() else []
    if not marked:
        return "no job running"
    return "running: " + ", ".join(marked[:4]) + (f" (+{len(marked) - 4})" if len(marked) > 4 else "")


# -- report ----------------------------------------------------------------------------------------------
HEADER = ["kill #", "stage / moment", "how gated", "rerun rc", "metrics equal", "outputs rewritten (count)",
          "RUNNING trials", "budget exact", "repeated LLM requests", "outcome"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        m = r.moment
        stage = f"{m.stage}: {m.moment}" if m else "none (uninterrupted control run)"
        gated = m.gated_by if m else "–"
        if m and r.kill_s is not None:
            gated += f" (fired at {r.kill_s:.1f} s; {r.landed})"
        rc = f"{r.rerun_rc}" + (f" (unlock {r.unlock_rc})" if r.unlock_rc not in (None, 0) else "")
        equal = "yes" if not r.diffs and r.rerun_rc == 0 else (f"no ({len(r.diffs)} values)" if r.diffs else "–")
        rewritten_cell = f"{len(r.rewritten)} of {r.finished_at_kill}" if m else "–"
        if m:
            repeated = f"{r.repeated}" + (f" (+{r.reasked_in_flight} in flight at kill)" if r.reasked_in_flight else "")
            repeated += f"; {r.requests[0]} + {r.requests[1]} requests"
        else:
            repeated = f"{r.requests[0]} requests"
        outcome = "PASS" if r.ok else "FAIL"
        cells = [r.number, stage, gated, rc, equal, rewritten_cell, str(r.studies.get("running", "?")),
                 "yes" if r.studies.get("exact") else "no", repeated, outcome]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    out = []
    for r in rows:
        items = list(r.notes)
        items += [f"rewritten: {t}" for t in r.rewritten]
        items += [f"differs: {d}" for d in r.diffs[:12]]
        if len(r.diffs) > 12:
            items.append(f"... and {len(r.diffs) - 12} more differing values")
        if r.studies.get("per_study"):
            items.append("trials after the rerun: " + "; ".join(
                f"{s} {c}" for s, c in r.studies["per_study"].items()))
        walls = f"first run {r.run_wall_s:.0f} s" + (f", recovery {r.rerun_wall_s:.0f} s" if r.moment else "")
        out.append(f"- **{r.number}** ({r.moment.name if r.moment else 'control'}; {walls}): " + "; ".join(items))
    return "\n".join(out)


def sizes_text(config: dict, reference_dir: Path) -> str:
    results = reference_dir / "results"
    lines = [f"- KBs: the first {SIZES['chunks_per_expert']} chunks of each of the demo's three experts "
             + f"({', '.join(EXPERTS)})"]
    contexts = []
    for e in EXPERTS:
        report = results / "queries" / f"{e}.report.json"
        if report.is_file():
            contexts.append(f"{e} {json.loads(report.read_text()).get('contexts')}")
    if contexts:
        lines.append(f"- contexts (LLM requests) per expert: {', '.join(contexts)}; "
                     f"{config['synthesize']['questions_per_context']} questions each")
    report = results / "dataset" / "report.json"
    if report.is_file():
        splits = json.loads(report.read_text()).get("splits", {})
        lines.append("- dataset rows: " + ", ".join(f"{s} {v.get('rows')}" for s, v in splits.items())
                     + f" (train: {splits.get('train', {}).get('kind')})")
    lines.append("- changed from config.yaml: " + ", ".join(f"`{k}: {v}`" for k, v in SIZES.items()
                                                         if k != "chunks_per_expert")
                 + f", `router.probe.patience: {config['router']['probe']['patience']}`, "
                 "`synthesize.backend: openai` (the loopback stub, "
                 f"{STUB_DELAY_S} s per reply, concurrency 2), `device: cpu`")
    budgets = studies_with_budget(config)
    lines.append("- tuning budgets: " + ", ".join(f"{s} {n}" for s, n in budgets.items())
                 + f" ({config['tuning']['workers']} worker per study, journal storage)")
    return "\n".join(lines)


def code_version(checkout: Path = REPO) -> str:
    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, check=False)
        return run.stdout.strip()

    dirty = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    where = "" if checkout == REPO else f"{checkout}: "
    return where + f"commit {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        f" + {len(dirty)} uncommitted changes" if dirty else "")


def write_report(path: Path, argv: list[str], started: dt.datetime, rows: list[Row], config: dict,
                 reference_dir: Path, reference_wall: float, total_wall: float) -> str:
    passed = sum(r.ok for r in rows if r.moment)
    kills = sum(1 for r in rows if r.moment)
    text = f"""# fault_sweep.py: resume under SIGKILL

Command: `{' '.join(shlex.quote(a) for a in argv)}`
Date: {started:%Y-%m-%d %H:%M} ({platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()});
code: {CODE_VERSION} (copied once at the start; every run used that copy);
total wall {total_wall / 60:.1f} min. What else shared the CPU is not controlled: timings are indicative.

Each kill: a fresh work dir, `snakemake --cores {CORES}` on the reduced config, SIGKILL to Snakemake's whole
process group when the gate fires, then the README's recovery: `snakemake --unlock` and
`snakemake --cores {CORES} --rerun-incomplete` with the same config. Reference: one uninterrupted run,
{reference_wall:.0f} s wall.

Reduced config (config.yaml with):
{sizes_text(config, reference_dir)}

Result: {passed} of {kills} kills pass every check.

{table(rows)}

Columns: *metrics equal*: router/metrics.json, backbone/metrics.json, tuning/*.json (chosen params,
best value and metrics, and the points each study tried: params and values of its COMPLETE/PRUNED
trials), the λ Pareto rows or λ sweep, and a digest of the router's and the backbone's weights (tensors
and metadata), equal to the reference's exactly (timings, resume counters and trial numbers left out). *outputs rewritten*: outputs of jobs Snakemake had recorded as
finished at the kill whose size, mtime or sha256 changed, of all such outputs. *RUNNING trials*: across
the studies after the rerun (WAITING counted as a failure too). *budget exact*: COMPLETE trials = n_trials
in every study with a budget. *repeated LLM requests*: requests of the rerun whose reply was already in
the cache when the rerun started (must be 0); "in flight" ones were sent before the kill but their reply
was never stored; then requests of the first run + of the rerun.

Notes per run:

{details(rows)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# -- main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=None, help=f"how many moments (default all {len(MOMENTS)}), "
                        "spread over the DAG")
    parser.add_argument("--only", default=None, help="comma-separated moment names: " +
                        ", ".join(m.name for m in MOMENTS))
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs (default: removed at the end)")
    parser.add_argument("--no-control", action="store_true", help="skip the second uninterrupted run")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose workflow, package and data "
                        "the runs use (default: this one), e.g. a copy with a fix to try")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fault_sweep.md")
    args = parser.parse_args(argv)
    moments = pick(MOMENTS, args.kills, args.only.split(",") if args.only else None)

    started, t_start = dt.datetime.now(), time.monotonic()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fault_sweep."))
    root.mkdir(parents=True, exist_ok=True)
    created = []
    active: list[subprocess.Popen] = []

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    global CODE, CODE_VERSION
    recorder = Recorder()
    rows: list[Row] = []
    try:
        CODE, CODE_VERSION = snapshot_code(root, args.code.resolve()), code_version(args.code.resolve())
        with StubLLM(default=recorder) as stub:
            print(f"fault_sweep: runs under {root}; stub LLM at {stub.url}; moments: "
                  f"{', '.join(m.name for m in moments)}", flush=True)
            ref_row, ref_dir = scenario(root, "reference", None, stub.url, recorder, None, active)
            created.append(ref_dir)
            ref_row.requests = (len(recorder.keys("reference:run")), 0)
            if ref_row.rerun_rc != 0:
                print(f"reference run failed (rc {ref_row.rerun_rc}); see {ref_dir}/snakemake.run.log", flush=True)
                return 1
            ref_keys = set(recorder.keys("reference:run"))
            if ref_keys != cached_keys(ref_dir):
                print("warning: the stub's request keys differ from the cache's: the repeated-request check "
                      "cannot match requests to cache entries", flush=True)
            reference = final_results(ref_dir)
            config = yaml.safe_load((ref_dir / "config.yaml").read_text())
            print(f"reference: {ref_row.run_wall_s:.0f} s, {len(ref_keys)} LLM requests", flush=True)
            todo: list[tuple[str, Moment | None]] = [] if args.no_control else [("control", None)]
            todo += [(f"{i + 1:02d}", m) for i, m in enumerate(moments)]
            for number, moment in todo:
                row, workdir = scenario(root, number, moment, stub.url, recorder, reference, active)
                created.append(workdir)
                if moment is None:
                    row.requests = (len(recorder.keys(f"{number}:run")), 0)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
            total = time.monotonic() - t_start
            write_report(args.out, [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], started,
                                rows, config, ref_dir, ref_row.run_wall_s, total)
            print(table(rows), flush=True)
            print(f"\nwrote {args.out}; total wall {total / 60:.1f} min", flush=True)
    finally:
        for proc in active:
            if proc.poll() is None:
                kill_tree(proc)
        if not args.keep:
            for d in created:
                shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(root / "code", ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
