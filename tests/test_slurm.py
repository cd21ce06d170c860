"""The Slurm path for real: slurm_profile/ and the workflow on a single-node Slurm brought up here.

tests/services/slurm.py starts munged, MariaDB, slurmdbd, slurmctld and slurmd in a temp dir (one
cluster for this module, ~10 s) with a fake 2-GPU node. Every snakemake run below is the command a
user types on a login node, ``snakemake --workflow-profile slurm_profile ...``, with the account and
partitions in the environment (MOEGATE_*) and only CI timings on the command line. What ran where is
read back from Slurm's own accounting (sacct), never from Snakemake's word for it.

Without the Debian packages or root the Slurm tests skip with the reason (under CI=true they fail:
see conftest.service_unavailable); the profile test needs neither. The toy workflow takes well under a
minute; the whole DAG with a cancelled job and its rerun takes minutes: marked slow (``make
test-slurm``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, service_unavailable

sys.path.insert(0, str(Path(__file__).parent / "services"))
from slurm import ACCOUNT, SlurmCluster, unavailable_reason

BIN = Path(sys.executable).parent
PROFILE = REPO / "slurm_profile"
TEST_CONFIG = REPO / "workflow" / "configs" / "slurm_test.yaml"
GPU_RULES = {"states", "train_backbone", "tune_worker", "train_router", "evaluate"}
CPU_RULES = {"ingest", "cluster", "dataset"}
LOCAL_RULES = {"synthesize", "tune_create", "tune_collect", "tune_lambda_collect", "all"}
# CI overrides. The plugin polls Slurm this many seconds after a submission or a finished job, then 10 s
# later each time (+10 s per empty poll): 15 s matches these 10-35 s jobs (the profile's 40 s suits hours-
# long ones). Short latency wait (one file system); every job's Slurm log kept for the assertions.
CI_FLAGS = ("--slurm-init-seconds-before-status-checks", "15", "--latency-wait", "5",
            "--slurm-keep-successful-logs")
PARTITIONS = {"MOEGATE_SLURM_ACCOUNT": ACCOUNT, "MOEGATE_CPU_PARTITION": "compute",
              "MOEGATE_GPU_PARTITION": "gpu"}


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One running test cluster for the module; torn down by PID afterwards (a skip, or under CI a
    failure, when this machine cannot run one)."""
    reason = unavailable_reason()
    if reason:
        service_unavailable(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def run_env(slurm: SlurmCluster, **extra: str) -> dict[str, str]:
    env = slurm.env
    env.update(PARTITIONS)
    env.update({"PATH": f"{slurm.bin}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def snakemake_cmd(results: Path, backbone: Path, *extra: str, limit_s: int = 900) -> list[str]:
    """The login-node command on the shipped tiny config, in a ``timeout -s INT`` (SIGTERM does not stop it).

    The backbone is the 3-layer random BERT of conftest (CI time goes to Slurm, not to training MiniLM).
    """
    return ["timeout", "-s", "INT", str(limit_s), str(BIN / "snakemake"), "--workflow-profile", str(PROFILE),
            *CI_FLAGS, "--slurm-logdir", str(results.parent / "slurm_logs"),
            "--configfile", str(TEST_CONFIG), "--replace-workflow-config", *extra,
            "--config", f"results={results}", f"backbone={{'model': '{backbone}'}}"]  # last: takes the rest


def run_snakemake(slurm: SlurmCluster, results: Path, backbone: Path, *extra: str,
                  limit_s: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(results, backbone, *extra, limit_s=limit_s), cwd=REPO,
                          env=run_env(slurm), capture_output=True, text=True, timeout=limit_s + 60, check=False)
    (results.parent / f"snakemake.{time.time_ns()}.log").write_text(proc.stdout + proc.stderr)
    return proc


def run_id(output: str) -> str:
    """The Slurm job name of one snakemake run (the plugin's 'SLURM run ID')."""
    found = re.findall(r"SLURM run ID: (\S+)", output)
    assert len(found) == 1, f"expected one 'SLURM run ID' line in snakemake's output:\n{output[-3000:]}"
    return found[0]


def job_key(job: dict) -> tuple[str, str]:
    """(rule, wildcards) of a job the plugin submitted, from its comment ``rule_<name>[_wildcards_<values>]``."""
    m = re.fullmatch(r"rule_(.+?)(?:_wildcards_(.*))?", job["Comment"])
    assert m, f"job {job['JobIDRaw']}: comment {job['Comment']!r} does not name a rule"
    return m.group(1), m.group(2) or ""


def jobs_of(slurm: SlurmCluster, name: str) -> list[dict]:
    return [j for j in slurm.jobs() if j["JobName"] == name]


def settled_jobs(slurm: SlurmCluster, name: str, limit_s: float = 60) -> list[dict]:
    """The jobs named ``name`` once none is pending or running any more."""
    end = time.monotonic() + limit_s
    while True:
        jobs = jobs_of(slurm, name)
        if not any(j["State"] in ("PENDING", "RUNNING", "COMPLETING") for j in jobs) or time.monotonic() > end:
            return jobs
        time.sleep(1)


def outputs_with_mtimes(results: Path) -> dict[str, int]:
    """Every file under results/ except logs, config and the Optuna journal (rewritten by design)."""
    skip = ("logs/", "config.resolved.yaml", "tuning/optuna.journal", "cache/")
    return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in results.rglob("*")
            if p.is_file() and not str(p.relative_to(results)).startswith(skip)
            and not p.name.startswith(".")}


# -- the profile itself (no Slurm needed) -------------------------------------------------------------

def dry_run_resources(env: dict[str, str], tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    """{rule: [resources of each job]} from a dry run with the profile (no cluster is contacted)."""
    cmd = [str(BIN / "snakemake"), "-n", "--workflow-profile", str(PROFILE), "--configfile", str(TEST_CONFIG),
           "--replace-workflow-config", "--config", f"results={tmp_path / 'results'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif rule and (m := re.match(r"^\s+resources: (.*)$", line)):
            found.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in m.group(1).split(", ")))
            rule = None
    return found


def test_profile_takes_account_and_partitions_from_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEGATE_", "SLURM_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "MOEGATE_SLURM_ACCOUNT": "pirg_x",
                "MOEGATE_CPU_PARTITION": "compute", "MOEGATE_GPU_PARTITION": "gpu", "MOEGATE_GPU_MODEL": "a100"})
    resources = dry_run_resources(env, tmp_path)
    # slurm_test.yaml trains a finetune router, so its DAG has no states rule (frozen/lpft only)
    assert (GPU_RULES | CPU_RULES) - {"states"} <= set(resources), sorted(resources)
    for rule, jobs in resources.items():
        for res in jobs:
            assert res["slurm_account"] == "pirg_x", (rule, res)
            if rule in GPU_RULES:
                assert (res["gpu"], res["gpu_model"], res["slurm_partition"]) == ("1", "a100", "gpu"), (rule, res)
                assert int(res["mem_mb"]) >= 8000 and int(res["runtime"]) >= 30, (rule, res)
            else:
                assert "gpu" not in res and res["slurm_partition"] == "compute", (rule, res)
            if rule in GPU_RULES | CPU_RULES:  # their own resources block, not the profile's defaults
                assert "cpus_per_task" in res, (rule, res)

    # nothing set: no account (the plugin guesses), the cluster's default CPU partition, "gpu" for GPUs
    bare = {k: v for k, v in env.items() if not k.startswith("MOEGATE_")}
    resources = dry_run_resources(bare, tmp_path)
    for rule, jobs in resources.items():
        for res in jobs:
            assert "slurm_account" not in res, (rule, res)
            assert res.get("slurm_partition") == ("gpu" if rule in GPU_RULES else None), (rule, res)


# -- a real Slurm -----------------------------------------------------------------------------------

TOY_SNAKEFILE = """\
localrules: synthesize

rule all:
    input: "out/evaluate.txt"

rule ingest:
    output: "out/ingest.txt"
    resources: mem_mb=1000, runtime=5, cpus_per_task=1
    shell: "echo job=$SLURM_JOB_ID partition=$SLURM_JOB_PARTITION > {output}"

rule synthesize:
    input: "out/ingest.txt"
    output: "out/synthesize.txt"
    shell: "echo job=${{SLURM_JOB_ID:-none}} > {output}"

rule evaluate:
    input: "out/synthesize.txt"
    output: "out/evaluate.txt"
    resources: mem_mb=1000, runtime=5, cpus_per_task=1
    shell: "echo job=$SLURM_JOB_ID partition=$SLURM_JOB_PARTITION gpus=${{CUDA_VISIBLE_DEVICES:-none}} > {output}"
"""


@pytest.mark.slurm
def test_profile_runs_a_workflow_through_the_slurm_plugin(slurm, tmp_path):
    """The profile on a three-rule workflow: CPU rule, local rule, GPU rule (named like ours)."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    cmd = ["timeout", "-s", "INT", "300", str(BIN / "snakemake"), "--workflow-profile", str(PROFILE), *CI_FLAGS]
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(slurm), capture_output=True, text=True, timeout=360,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    jobs = jobs_of(slurm, run_id(proc.stdout + proc.stderr))
    by_rule = {job_key(j)[0]: j for j in jobs}
    assert sorted(by_rule) == ["evaluate", "ingest"] and len(jobs) == 2, jobs
    assert by_rule["ingest"]["Partition"] == "compute" and "gres/gpu" not in by_rule["ingest"]["AllocTRES"]
    assert by_rule["evaluate"]["Partition"] == "gpu" and "gres/gpu=1" in by_rule["evaluate"]["AllocTRES"]
    assert {j["Account"] for j in jobs} == {ACCOUNT} and {j["State"] for j in jobs} == {"COMPLETED"}
    # the jobs wrote their Slurm job id; the local rule ran on the "login node", outside any job
    assert (tmp_path / "out" / "ingest.txt").read_text().split() == [f"job={by_rule['ingest']['JobIDRaw']}",
                                                                     "partition=compute"]
    assert (tmp_path / "out" / "evaluate.txt").read_text().split()[:2] == [
        f"job={by_rule['evaluate']['JobIDRaw']}", "partition=gpu"]
    assert (tmp_path / "out" / "synthesize.txt").read_text().strip() == "job=none"


# -- the whole DAG, a job cancelled mid-trial, and the same command again -----------------------------
# One scenario serves four tests (the DAG twice would double CI time): run A is the login-node command
# on slurm_test.yaml; while a backbone tuning worker is inside a trial, its Slurm job is scancelled
# (suspended first, so that the trial is known to be unfinished when the scancel lands).
# Run A must then fail cleanly; run B, the same command, must finish the whole DAG, redoing only the
# unfinished work. Both runs' jobs together are the whole DAG, read back from sacct.

@dataclass
class Scenario:
    results: Path
    code_a: int
    out_a: str
    jobs_a: list[dict]
    cancelled_job: str
    killed_trial: int
    killed_state_a: str  # the killed trial's state in the storage when run A has ended
    outputs_a: dict[str, int]
    code_b: int
    out_b: str
    jobs_b: list[dict]
    outputs_b: dict[str, int]
    wall_a: float
    wall_b: float


def tuning_trials(results: Path, study: str) -> list:
    import optuna

    from moegate.config import load
    from moegate.storage import open_storage, study_name

    config = load(TEST_CONFIG, {"results": str(results)})
    st = optuna.load_study(study_name=study_name(config, study), storage=open_storage(config))
    return st.get_trials(deepcopy=True)


def trials_in_objective(results: Path, study: str) -> list:
    """RUNNING ``study`` trials inside their objective (params drawn) whose worker recorded its Slurm job."""
    from moegate.storage import OWNER_KEY

    if not (results / "tuning" / "optuna.journal").exists():
        return []
    try:
        trials = tuning_trials(results, study)
    except KeyError:  # the study is not created yet
        return []
    return [t for t in trials if t.state.name == "RUNNING" and t.params
            and (t.user_attrs.get(OWNER_KEY) or {}).get("slurm_job_id")]


def process_stopped(pid: int, limit_s: float = 30) -> bool:
    """True once process ``pid`` is stopped (state T in /proc); False if it ends or ``limit_s`` passes."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone
            return False
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return True
        time.sleep(0.1)
    return False


def suspend_a_job_mid_trial(slurm: SlurmCluster, results: Path, study: str, proc: subprocess.Popen,
                            limit_s: float = 600) -> tuple[int, str]:
    """(trial number, Slurm job id) of a ``study`` trial caught unfinished, its job now suspended.

    A trial seen RUNNING may end before a scancel lands; so its job is suspended (``scontrol suspend``
    stops the job's processes), its worker process is seen stopped, and the storage read again: a trial
    still RUNNING then cannot finish before the scancel. Otherwise the job is resumed and another tried.
    """
    from moegate.storage import OWNER_KEY

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        assert proc.poll() is None, "snakemake ended before a trial was caught mid-run"
        for trial in trials_in_objective(results, study):
            owner = trial.user_attrs[OWNER_KEY]
            job_id = str(owner["slurm_job_id"])
            suspend = subprocess.run(["scontrol", "suspend", job_id], env=slurm.env, capture_output=True,
                                     text=True, timeout=30, check=False)
            if suspend.returncode != 0:  # the job ended meanwhile
                continue
            if process_stopped(int(owner["pid"])) and \
                    trial.number in {t.number for t in trials_in_objective(results, study)}:
                return trial.number, job_id
            subprocess.run(["scontrol", "resume", job_id], env=slurm.env, capture_output=True, timeout=30,
                           check=False)
        time.sleep(1)
    raise AssertionError(f"no {study} trial caught inside its objective within {limit_s} s")


@pytest.fixture(scope="module")
def scenario(slurm, tmp_path_factory, tiny_bert_dir) -> Scenario:
    tmp = tmp_path_factory.mktemp("dag")
    results = tmp / "results"
    cmd = snakemake_cmd(results, tiny_bert_dir, "--retries", "0")  # a cancelled job is not retried
    t0 = time.monotonic()
    with (tmp / "run_a.log").open("w") as log_a:
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(slurm), stdout=log_a, stderr=subprocess.STDOUT)
        try:
            trial, job_id = suspend_a_job_mid_trial(slurm, results, "backbone", proc)
            subprocess.run(["scancel", job_id], env=slurm.env, check=True, timeout=30)
            code_a = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
    wall_a = time.monotonic() - t0
    out_a = (tmp / "run_a.log").read_text()
    jobs_a = settled_jobs(slurm, run_id(out_a))
    outputs_a = outputs_with_mtimes(results)
    killed_state_a = next(t.state.name for t in tuning_trials(results, "backbone") if t.number == trial)

    t0 = time.monotonic()
    proc_b = run_snakemake(slurm, results, tiny_bert_dir, "--retries", "0")  # the same command again
    wall_b = time.monotonic() - t0
    out_b = proc_b.stdout + proc_b.stderr
    jobs_b = settled_jobs(slurm, run_id(out_b)) if "SLURM run ID" in out_b else []
    print(f"\nrun A (cancelled job {job_id}, trial {trial}, {killed_state_a} after it): {wall_a:.0f} s, Slurm jobs:",
          [(j["JobIDRaw"], job_key(j), j["State"]) for j in jobs_a],
          f"\nrun B (same command): {wall_b:.0f} s, Slurm jobs:",
          [(j["JobIDRaw"], job_key(j), j["State"]) for j in jobs_b])
    return Scenario(results, code_a, out_a, jobs_a, job_id, trial, killed_state_a, outputs_a,
                    proc_b.returncode, out_b, jobs_b, outputs_with_mtimes(results), wall_a, wall_b)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_cancelled_mid_trial_fails_the_run_cleanly(scenario):
    s = scenario
    assert s.code_a == 1, s.out_a[-5000:]
    assert re.search(rf"SLURM-job '{s.cancelled_job}' failed, SLURM status is: 'CANCELLED", s.out_a), s.out_a[-5000:]
    cancelled = [j for j in s.jobs_a if j["JobIDRaw"] == s.cancelled_job]
    assert len(cancelled) == 1 and cancelled[0]["State"].startswith("CANCELLED"), s.jobs_a
    assert job_key(cancelled[0])[0] == "tune_worker"
    # the scancel did interrupt the trial: left RUNNING by the killed worker, or already failed by the
    # other worker's stale-trial check (its PID is gone); never completed
    assert s.killed_state_a in ("RUNNING", "FAIL"), (s.killed_trial, s.killed_state_a)
    # nothing of the cancelled work looks finished: no marker of its worker, no tuned values, no router
    worker = job_key(cancelled[0])[1].split("_")[-1]
    assert f"tuning/backbone/worker{worker}.done" not in s.outputs_a
    assert "tuning/backbone.json" not in s.outputs_a and "router/model.safetensors" not in s.outputs_a
    # the jobs that finished before the cancel did complete
    done = Counter(job_key(j)[0] for j in s.jobs_a if j["State"] == "COMPLETED")
    assert done["ingest"] == 3 and done["cluster"] == 3 and done["dataset"] == 1, done


@pytest.mark.slurm
@pytest.mark.slow
def test_the_same_command_again_redoes_only_the_unfinished_work(scenario):
    s = scenario
    assert s.code_b == 0, s.out_b[-8000:]
    rewritten = sorted(k for k, mtime in s.outputs_a.items() if s.outputs_b.get(k) != mtime)
    assert not rewritten, f"finished outputs were redone by the rerun: {rewritten}"
    keys_a = {job_key(j) for j in s.jobs_a if j["State"] == "COMPLETED"}
    keys_b = [job_key(j) for j in s.jobs_b]
    assert not keys_a & set(keys_b), f"jobs finished in run A ran again in run B: {keys_a & set(keys_b)}"
    assert not {"ingest", "cluster", "dataset"} & {rule for rule, _ in keys_b}, keys_b
    cancelled = next(job_key(j) for j in s.jobs_a if j["JobIDRaw"] == s.cancelled_job)
    assert cancelled in keys_b, (cancelled, keys_b)


@pytest.mark.slurm
@pytest.mark.slow
def test_whole_dag_ran_as_slurm_jobs_with_a_gpu_for_each_gpu_rule(scenario):
    s = scenario
    assert s.code_b == 0, s.out_b[-8000:]
    for path in ("router/model.safetensors", "router/metrics.json", "tuning/lambda_pareto.csv",
                 "evaluation/exit_layers.png", "clusters/dsci_101.png", "queries/dsci_101.parquet"):
        assert path in s.outputs_b, path
    completed = [j for j in s.jobs_a + s.jobs_b if j["State"] == "COMPLETED"]
    per_rule = Counter(job_key(j)[0] for j in completed)
    config = yaml.safe_load(TEST_CONFIG.read_text())
    experts, workers = len(config["experts"]), config["tuning"]["workers"]
    # every non-local job of the DAG completed as a Slurm job, exactly once
    assert per_rule == {"ingest": experts, "cluster": experts, "dataset": 1, "train_backbone": 1,
                        "tune_worker": 4 * workers, "train_router": 1, "evaluate": 1}, per_rule
    assert len({job_key(j) for j in completed}) == len(completed)
    out = s.out_a + s.out_b
    for rule in ("synthesize", "tune_create", "tune_collect", "tune_lambda_collect"):
        assert re.search(rf"^localrule {rule}:", out, re.MULTILINE), f"{rule} did not run on the login node"
    for job in s.jobs_a + s.jobs_b:
        rule = job_key(job)[0]
        assert rule not in LOCAL_RULES and job["Account"] == ACCOUNT, job
        if rule in GPU_RULES:
            assert job["Partition"] == "gpu" and "gres/gpu=1" in job["AllocTRES"], job
        else:
            assert job["Partition"] == "compute" and "gres/gpu" not in job["AllocTRES"], job
    # the plugin's own record: one Slurm log per job under <logdir>/rule_<name>/<wildcards>/
    logs = {p.stem for p in (s.results.parent / "slurm_logs").rglob("*.log")}
    assert logs >= {j["JobIDRaw"] for j in s.jobs_a + s.jobs_b}, logs


@pytest.mark.slurm
@pytest.mark.slow
def test_no_optuna_trial_is_lost_or_left_running(scenario):
    from moegate.storage import OWNER_KEY

    s = scenario
    config = yaml.safe_load(TEST_CONFIG.read_text())
    # each trial names the Slurm job that ran it: a tune_worker job of one of the two runs
    worker_jobs = {j["JobIDRaw"] for j in s.jobs_a + s.jobs_b if job_key(j)[0] == "tune_worker"}
    for study in ("backbone", "submodels", "training", "lambda"):
        trials = tuning_trials(s.results, study)
        states = Counter(t.state.name for t in trials)
        assert states.get("RUNNING", 0) == 0, (study, states)
        assert states["COMPLETE"] == config["tuning"][study]["n_trials"], (study, states)
        owners = {str(t.user_attrs[OWNER_KEY]["slurm_job_id"]) for t in trials if t.state.name == "COMPLETE"}
        assert owners <= worker_jobs, (study, owners, worker_jobs)
    trials = tuning_trials(s.results, "backbone")
    killed = next(t for t in trials if t.number == s.killed_trial)
    assert killed.state.name == "FAIL", killed
    assert any(t.state.name == "COMPLETE" and t.params == killed.params for t in trials), \
        [(t.number, t.state.name, t.params) for t in trials]
