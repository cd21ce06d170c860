"""The Slurm path for real: slurm_profile/ and the workflow on a single-node Slurm brought up here.

tests/services/slurm.py starts munged, MariaDB, slurmdbd, slurmctld and slurmd in a temp dir (one
cluster for this module, ~10 s) with a fake 2-GPU node. Every snakemake run below is the command a
user types on a login node, ``snakemake --workflow-profile slurm_profile ...``, with the account and
partitions in the environment (MOEGATE_*) and only CI timings on the command line. What ran where is
read back from Slurm's own accounting (sacct), never from Snakemake's word for it.

Without the Debian packages or root the Slurm tests skip with the reason; the profile test needs
neither. The whole-DAG, resume and submitit tests take minutes: marked slow (``make test-slow``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent / "services"))
from slurm import ACCOUNT, SlurmCluster, unavailable_reason  # noqa: E402

BIN = Path(sys.executable).parent
PROFILE = REPO / "slurm_profile"
TEST_CONFIG = REPO / "workflow" / "configs" / "slurm_test.yaml"
GPU_RULES = {"train_backbone", "tune_worker", "train_router", "evaluate"}
CPU_RULES = {"ingest", "cluster", "dataset"}
LOCAL_RULES = {"synthesize", "tune_create", "tune_collect", "tune_lambda_collect", "all"}
# CI overrides: poll Slurm every few seconds (the profile's 40 s suits a real cluster), short latency wait,
# and keep every job's Slurm log with the run's other files for the assertions and for debugging
CI_FLAGS = ("--slurm-init-seconds-before-status-checks", "3", "--latency-wait", "5",
            "--slurm-keep-successful-logs")
PARTITIONS = {"MOEGATE_SLURM_ACCOUNT": ACCOUNT, "MOEGATE_CPU_PARTITION": "compute",
              "MOEGATE_GPU_PARTITION": "gpu"}


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One running test cluster for the module; torn down by PID afterwards."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
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
                          env=run_env(slurm), capture_output=True, text=True, timeout=limit_s + 60)
    (results.parent / f"snakemake.{time.time_ns()}.log").write_text(proc.stdout + proc.stderr)
    return proc


def run_id(output: str) -> str:
    """The Slurm job name of one snakemake run (the plugin's 'SLURM run ID')."""
    found = re.findall(r"SLURM run ID: (\S+)", output)
    assert len(found) == 1, f"expected one 'SLURM run ID' line in snakemake's output:\n{output[-3000:]}"
    return found[0]


def rule_of(job: dict) -> str:
    """The rule of a job submitted by the plugin, from its comment ``rule_<name>[_wildcards_<values>]``."""
    m = re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", job["Comment"])
    assert m, f"job {job['JobIDRaw']}: comment {job['Comment']!r} does not name a rule"
    return m.group(1)


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
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
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
    assert GPU_RULES | CPU_RULES <= set(resources), sorted(resources)
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
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(slurm), capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    jobs = jobs_of(slurm, run_id(proc.stdout + proc.stderr))
    by_rule = {rule_of(j): j for j in jobs}
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


@pytest.mark.slurm
@pytest.mark.slow
def test_whole_dag_runs_as_slurm_jobs_with_gpus_for_the_gpu_rules(slurm, tmp_path, tiny_bert_dir):
    results = tmp_path / "results"
    t0 = time.monotonic()
    proc = run_snakemake(slurm, results, tiny_bert_dir)
    wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    for path in ("router/model.safetensors", "router/metrics.json", "tuning/lambda_pareto.csv",
                 "evaluation/exit_layers.png", "clusters/dsci_101.png"):
        assert (results / path).is_file(), path

    jobs = jobs_of(slurm, run_id(out))
    per_rule = Counter(rule_of(j) for j in jobs)
    config = yaml.safe_load(TEST_CONFIG.read_text())
    experts, workers = len(config["experts"]), config["tuning"]["workers"]
    # every non-local rule of the DAG ran as Slurm jobs, once per job of the DAG
    assert per_rule == {"ingest": experts, "cluster": experts, "dataset": 1, "train_backbone": 1,
                        "tune_worker": 4 * workers, "train_router": 1, "evaluate": 1}, per_rule
    assert not LOCAL_RULES & set(per_rule)
    for rule in ("synthesize", "tune_create", "tune_collect", "tune_lambda_collect"):
        assert re.search(rf"^localrule {rule}:", out, re.M), f"{rule} did not run on the login node"
    for job in jobs:
        rule = rule_of(job)
        assert job["State"] == "COMPLETED" and job["Account"] == ACCOUNT, job
        if rule in GPU_RULES:
            assert job["Partition"] == "gpu" and "gres/gpu=1" in job["AllocTRES"], job
        else:
            assert job["Partition"] == "compute" and "gres/gpu" not in job["AllocTRES"], job
    # the plugin's own record: one Slurm log per job under <logdir>/rule_<name>/
    logs = list((tmp_path / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} >= {j["JobIDRaw"] for j in jobs}, (sorted(p.name for p in logs), jobs)
    print(f"\nwhole DAG on Slurm: {len(jobs)} Slurm jobs {dict(per_rule)} in {wall:.0f} s")


def tuning_trials(results: Path, study: str) -> list:
    import optuna

    from moegate.config import load
    from moegate.storage import open_storage, study_name

    config = load(TEST_CONFIG, {"results": str(results)})
    st = optuna.load_study(study_name=study_name(config, study), storage=open_storage(config))
    return st.get_trials(deepcopy=True)


def wait_for_running_trial(results: Path, study: str, proc: subprocess.Popen, limit_s: float = 600):
    """The first RUNNING trial of ``study`` whose owner recorded its Slurm job (a worker mid-trial)."""
    from moegate.storage import OWNER_KEY

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        assert proc.poll() is None, "snakemake ended before any trial ran"
        if (results / "tuning" / "optuna.journal").exists():
            try:
                for t in tuning_trials(results, study):
                    owner = t.user_attrs.get(OWNER_KEY) or {}
                    if t.state.name == "RUNNING" and owner.get("slurm_job_id"):
                        return t, owner["slurm_job_id"]
            except KeyError:  # the study is not created yet
                pass
        time.sleep(1)
    raise AssertionError(f"no RUNNING {study} trial with a Slurm job within {limit_s} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_mid_trial_fails_cleanly_and_the_same_command_redoes_only_unfinished_work(slurm, tmp_path,
                                                                                       tiny_bert_dir):
    results = tmp_path / "results"
    target = str(results / "tuning" / "backbone.json")  # data stages + the backbone study
    flags = ("--retries", "0", target)  # a cancelled job is not retried: the run must fail
    cmd = snakemake_cmd(results, tiny_bert_dir, *flags)
    log_a = (tmp_path / "run_a.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(slurm), stdout=log_a, stderr=subprocess.STDOUT)
    try:
        trial, job_id = wait_for_running_trial(results, "backbone", proc)
        time.sleep(2)  # well inside the trial's training
        subprocess.run(["scancel", job_id], env=slurm.env, check=True, timeout=30)
        code_a = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        log_a.close()
    out_a = (tmp_path / "run_a.log").read_text()
    assert code_a == 1, out_a[-5000:]
    assert "CANCELLED" in out_a, out_a[-5000:]
    run_a = run_id(out_a)
    jobs_a = jobs_of(slurm, run_a)
    cancelled = [j for j in jobs_a if j["JobIDRaw"] == job_id]
    assert cancelled and cancelled[0]["State"].startswith("CANCELLED"), jobs_a
    assert not (results / "tuning" / "backbone.json").exists()
    before = outputs_with_mtimes(results)
    assert any(k.startswith("dataset/") for k in before) and not any(".tmp" in k for k in before), before

    # the same command again: no --unlock, no cleanup by hand
    proc_b = run_snakemake(slurm, results, tiny_bert_dir, *flags)
    out_b = proc_b.stdout + proc_b.stderr
    assert proc_b.returncode == 0, out_b[-8000:]
    jobs_b = jobs_of(slurm, run_id(out_b))
    after = outputs_with_mtimes(results)
    redone = sorted(k for k in before if after.get(k) != before[k])
    assert not redone, f"finished outputs were rewritten by the rerun: {redone}"
    rules_a = Counter(rule_of(j) for j in jobs_a)
    rules_b = Counter(rule_of(j) for j in jobs_b)
    # only the unfinished work ran again: no data stage, only the tuning workers that did not finish
    assert set(rules_b) == {"tune_worker"}, (rules_a, rules_b)
    done_workers = [k for k in before if k.startswith("tuning/backbone/worker") and k.endswith(".done")]
    assert rules_b["tune_worker"] == 2 - len(done_workers), (rules_b, done_workers)
    assert (results / "tuning" / "backbone.json").is_file()

    # Optuna: nothing stuck RUNNING, the budget met, the cancelled trial's parameters run to completion
    trials = tuning_trials(results, "backbone")
    states = Counter(t.state.name for t in trials)
    assert states.get("RUNNING", 0) == 0 and states["COMPLETE"] == 2, states
    killed = next(t for t in trials if t.number == trial.number)
    assert killed.state.name == "FAIL", killed
    assert any(t.state.name == "COMPLETE" and t.params == killed.params for t in trials), \
        [(t.number, t.state.name, t.params) for t in trials]
    print("\nresume: run A Slurm jobs", [(j["JobIDRaw"], rule_of(j), j["State"]) for j in jobs_a],
          "\nresume: run B Slurm jobs", [(j["JobIDRaw"], rule_of(j), j["State"]) for j in jobs_b],
          "\nresume: trials", [(t.number, t.state.name) for t in trials])


@pytest.mark.slurm
def test_submitit_tuning_workers_run_as_a_slurm_job_array(slurm, tmp_path, tiny_bert_dir):
    """``moegate tune backbone --workers 2`` (launcher slurm) on a labelled dataset and the tiny backbone."""
    from conftest import tiny_questions
    from moegate.config import load
    from moegate.dataset import dataset

    csv = tmp_path / "questions.csv"
    csv.write_text("question,expert\n" + "".join(f'"{q}",{e}\n' for q, e in tiny_questions(per_expert=16)))
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config.update(results=str(tmp_path / "results"), device="auto")
    config["dataset"] = {"labelled_csv": str(csv), "val_fraction": 0.2, "test_fraction": 0.2, "max_length": 24}
    config["backbone"].update(model=str(tiny_bert_dir), batch_size=8)
    config["tuning"]["backbone"]["n_trials"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    dataset(load(path))  # the stage before tuning, here in-process

    t0 = time.monotonic()
    proc = subprocess.run([str(BIN / "moegate"), "tune", "backbone", "--config", str(path), "--workers", "2"],
                          cwd=tmp_path, env=run_env(slurm), capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    tuned = yaml.safe_load((tmp_path / "results" / "tuning" / "backbone.json").read_text())
    assert tuned["n_complete"] == 2 and tuned["params"], tuned
    # submitit returns when the results are written; the jobs themselves end a moment later
    array = settled_jobs(slurm, "moegate-tune-backbone")
    ids = sorted(j["JobIDRaw"] for j in array)
    assert len(array) == 2, array
    # one sbatch --array: the tasks share the array's submit time, each got a GPU in the gpu partition
    assert len({j["Submit"] for j in array}) == 1, array
    for job in array:
        assert job["State"] == "COMPLETED" and job["Partition"] == "gpu", job
        assert "gres/gpu=1" in job["AllocTRES"] and job["Account"] == ACCOUNT, job
    jobs = [j["job_id"] for j in tuned["launch"]["jobs"]]
    assert all(re.fullmatch(r"\d+_[01]", j) for j in jobs), jobs
    print(f"\nsubmitit array {jobs} (raw ids {ids}) in {wall:.0f} s")
