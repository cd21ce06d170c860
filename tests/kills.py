"""Real kills for tests: run a ``moegate`` command in a subprocess, hold it at a chosen point, SIGKILL it.

The point is chosen by ``patch``, Python run in the child before the command: it wraps a moegate function
so that, at the moment to kill, it calls ``pause_here()``. That writes the marker file and sleeps; the
test waits for the marker (not for a time), then sends SIGKILL: no exception handler, no ``finally``,
no atexit runs in the child, as when Slurm or the OOM killer ends a job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_PRELUDE = """
import os, sys, time

def pause_here():
    open(os.environ["MOEGATE_TEST_MARKER"], "w").close()
    time.sleep(3600)
"""


def child_env() -> dict:
    """The test's environment, one torch thread (the same arithmetic in every run) and offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def moegate(argv: list[str], patch: str = "", marker: Path | None = None, log: Path | None = None,
            timeout: float = 600) -> subprocess.Popen:
    """Start ``moegate ARGV`` in a child Python with ``patch`` applied; stderr goes to ``log``."""
    code = _PRELUDE + patch + f"\nfrom moegate.cli import run\nsys.argv = ['moegate', *{argv!r}]\nrun()\n"
    env = child_env()
    if marker is not None:
        env["MOEGATE_TEST_MARKER"] = str(marker)
    err = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed with the child)
    try:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if log is not None:
            err.close()


def run(argv: list[str], log: Path, timeout: float = 600) -> None:
    """``moegate ARGV`` to the end; AssertionError with its log when it fails."""
    proc = moegate(argv, log=log)
    if proc.wait(timeout) != 0:
        raise AssertionError(f"moegate {' '.join(argv)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")


def run_and_kill(argv: list[str], patch: str, marker: Path, log: Path, timeout: float = 600) -> None:
    """Start ``moegate ARGV`` with ``patch``, wait until it calls ``pause_here()``, SIGKILL it."""
    proc = moegate(argv, patch, marker, log)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"moegate {' '.join(argv)} exited {proc.returncode} before the kill point:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"moegate {' '.join(argv)} did not reach the kill point in {timeout} s")
        time.sleep(0.05)  # polling the marker: the gate is the file, not this interval
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
