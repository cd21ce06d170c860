"""Launch a study's N workers outside Snakemake, wait for them, and collect: a Slurm job array via
submitit, or local processes (``moegate tune launch STUDY --workers N [--launcher local]``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

from moegate.config import dump as dump_config
from moegate.io import write_text
from moegate.layout import Layout
from moegate.tune.results import collect
from moegate.tune.study import create
from moegate.tune.workers import worker

log = logging.getLogger(__name__)


def _slurm_worker(config: dict, study: str, worker_index: int) -> dict:
    """The function each job of the submitit array runs (module level, so it pickles by reference)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return worker(config, study, worker_index)


def launch(config: dict, study: str, workers: int | None = None, launcher: str = "slurm",
           config_path: str | os.PathLike | None = None) -> dict:
    """Create the study, run N workers (a Slurm job array via submitit, or local processes), wait, collect.

    The workers read the run config from ``tuning/<study>/launch.yaml`` (local) or from the pickled
    config (Slurm); neither holds a password: it reaches them through the environment, which Slurm
    jobs inherit from the submitting shell (or through ~/.pgpass). Returns collect's result plus
    ``launch`` = {launcher, workers, wall_s, jobs}.
    """
    n = workers or config["tuning"]["workers"]
    if n < 1:
        raise ValueError(f"--workers must be at least 1 (got {n})")
    if launcher not in ("slurm", "local"):
        raise ValueError(f"--launcher must be slurm or local (got {launcher!r})")
    layout = Layout.from_config(config)
    create(config, study)  # once, before any worker starts
    t0 = time.monotonic()
    if launcher == "local":
        jobs = _launch_local(config, study, n, layout)
    else:
        jobs = _launch_slurm(config, study, n, layout)
    info = {"launcher": launcher, "workers": n, "wall_s": round(time.monotonic() - t0, 3), "jobs": jobs}
    log.info("study %s: %d %s worker(s) finished in %.1f s", study, n, launcher, info["wall_s"])
    return collect(config, study, launch_info=info)


def _launch_local(config: dict, study: str, n: int, layout: Layout) -> list[dict]:
    config_file = layout.tuning / study / "launch.yaml"
    write_text(config_file, dump_config(config))
    logs = layout.logs / "tune"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # the password, if any, travels here, never on the command line
    if "OMP_NUM_THREADS" not in env:  # N workers share this machine's cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    running = []
    for i in range(n):
        log_path = logs / f"{study}.local.worker{i}.log"
        cmd = [sys.executable, "-m", "moegate.cli", "tune", "worker", study, "--index", str(i),
               "--config", str(config_file)]
        with open(log_path, "w") as out:
            running.append((i, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log_path,
                            time.monotonic()))
        log.info("worker %d: pid %d, log %s", i, running[-1][1].pid, log_path)
    jobs, failed = [], []
    for i, proc, log_path, started in running:
        code = proc.wait()
        jobs.append({"worker": i, "pid": proc.pid, "returncode": code, "log": str(log_path),
                     "wall_s": round(time.monotonic() - started, 3)})
        if code != 0:
            failed.append(f"worker {i} exited with {code} (log: {log_path})")
    if failed:
        raise RuntimeError(f"study {study}: " + "; ".join(failed))
    return jobs


def _launch_slurm(config: dict, study: str, n: int, layout: Layout) -> list[dict]:
    import submitit
    from submitit.core.utils import FailedJobError, UncompletedJobError

    slurm = config["tuning"]["slurm"]
    folder = layout.logs / "tune" / "submitit" / study
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")  # never the local fallback
    params: dict[str, Any] = {"name": f"moegate-tune-{study}", "timeout_min": slurm["time_min"],
                              "mem_gb": slurm["mem_gb"], "cpus_per_task": slurm["cpus"],
                              "slurm_array_parallelism": n}
    if slurm["partition"]:
        params["slurm_partition"] = slurm["partition"]
    account = slurm["account"] or os.environ.get("MOEGATE_SLURM_ACCOUNT")
    if account:
        params["slurm_account"] = account
    if slurm["gpus"]:
        params["slurm_gres"] = f"gpu:{slurm['gpus']}"
    executor.update_parameters(**params)
    array = executor.map_array(_slurm_worker, [config] * n, [study] * n, list(range(n)))
    log.info("study %s: Slurm array %s (%d workers), logs in %s", study, array[0].job_id.split("_")[0], n, folder)
    jobs, failed = [], []
    for i, job in enumerate(array):
        try:
            summary = job.result()
            jobs.append({"worker": i, "job_id": job.job_id, "returned": True, "wall_s": summary["wall_s"]})
        except (FailedJobError, UncompletedJobError) as e:  # they carry the job's stderr tail
            jobs.append({"worker": i, "job_id": job.job_id, "returned": False, "state": job.state})
            failed.append(f"worker {i} (job {job.job_id}): {type(e).__name__}: {str(e).strip()[-500:]}")
    if failed:
        raise RuntimeError(f"study {study}: " + "; ".join(failed))
    return jobs
