"""A real single-node Slurm cluster in a temporary directory, for the integration tests.

Brings up munged, MariaDB, slurmdbd, slurmctld and slurmd (all in the foreground, each our own child
process) with every file they write under one state directory, and tears them down by PID. Clients
reach it through ``SLURM_CONF`` (and an ``srun`` wrapper, see ``_write_configs``), so nothing under
/etc is touched and a second cluster on the machine is never disturbed. About 10 s to a job-ready node.

The node is sized by ``SlurmdParameters=config_overrides`` rather than by the hardware: it claims
8 CPUs, 32 GB and two GPUs (``gres.conf`` points them at /dev/null and /dev/zero) so that rules asking
for production-like resources schedule on a 2-core test machine; jobs see ``CUDA_VISIBLE_DEVICES`` but
torch finds no CUDA device, so the code runs on the CPU. Accounting (sacct, accounts, ``gres/gpu``
TRES per job, the job comment that holds the Snakemake rule name) runs through slurmdbd on MariaDB.

From pytest: ``SlurmCluster(tmp_dir).start()`` ... ``.stop()`` (tests/test_slurm.py has a fixture).
By hand::

    python tests/services/slurm.py up /tmp/slurm      # prints: export SLURM_CONF=... PATH=...
    python tests/services/slurm.py down /tmp/slurm    # stops the PIDs recorded in /tmp/slurm/pids.json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CLUSTER = "moegate-test"
ACCOUNT = "moegate_test"  # an account users may pass (the profile's MOEGATE_SLURM_ACCOUNT)
PARTITIONS = ("compute", "gpu")  # compute is the default; both hold the one node
NODE_CPUS = 8
NODE_MEMORY_MB = 32000
NODE_GPUS = 2
FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full")

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sacct", "sacctmgr", "scancel", "scontrol", "sinfo", "srun")


def missing_binaries() -> list[str]:
    """Names of the Slurm/munge/MariaDB programs not found on PATH or in /usr/sbin."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in DAEMONS + CLIENTS if shutil.which(b, path=path) is None]


def unavailable_reason() -> str | None:
    """Why a cluster cannot be brought up here (None when it can)."""
    missing = missing_binaries()
    if missing:
        return f"Slurm test cluster needs {', '.join(missing)} (run tests/services/install.sh as root)"
    if os.geteuid() != 0:
        return "Slurm test cluster needs root (slurmd starts jobs, SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(f"{name}: not installed (run tests/services/install.sh as root)")
    return found


class SlurmStartError(RuntimeError):
    """A daemon did not come up; the message carries the tail of its log."""


@dataclass
class SlurmCluster:
    """One single-node Slurm cluster whose state lives under ``root`` (created if missing)."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).resolve()

    # -- paths ------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, squeue, snakemake) talking to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    # -- bring-up ---------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> SlurmCluster:
        """Start every daemon in order; each step waits until its daemon answers."""
        reason = unavailable_reason()
        if reason:
            raise SlurmStartError(reason)
        for sub in ("etc", "munge", "mysql", "state", "spool", "log", "run", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in ("mysql", "dbd", "ctld", "slurmd")}
        deadline = time.monotonic() + timeout
        try:
            self._write_configs()
            self._start_munge(deadline)
            self._start_mariadb(deadline)
            self._start_slurmdbd(deadline)
            self._register_accounting()
            self._start_slurmctld(deadline)
            self._start_slurmd(deadline)
        except BaseException:
            self.stop()
            raise
        log.info("Slurm cluster %s up under %s (SLURM_CONF=%s)", CLUSTER, self.root, self.conf)
        return self

    def _write_configs(self) -> None:
        etc = self.root / "etc"
        host = socket.gethostname().split(".")[0]
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        conf = f"""\
# single-node test cluster written by tests/services/slurm.py
ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ports["ctld"]}
SlurmdPort={self.ports["slurmd"]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "run" / "slurmctld.pid"}
SlurmdPidFile={self.root / "run" / "slurmd.pid"}
SlurmctldLogFile={self.logs / "slurmctld.log"}
SlurmdLogFile={self.logs / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups or systemd in the test container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it one job takes the whole node's memory
DefMemPerCPU=1000
# finished jobs stay visible to squeue for 10 minutes (the plugin's squeue status mode needs this)
MinJobAge=600
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# the node's size comes from here, not from the 2-core hardware
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports["dbd"]}
# for slurmdbd connections the munge socket is given here, not by AuthInfo
AccountingStoragePass={self.munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:{NODE_GPUS} State=UNKNOWN
PartitionName={PARTITIONS[0]} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName={PARTITIONS[1]} Nodes=localhost MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)
        # fake GPU devices: any existing character devices will do, one per GPU
        devices = ",".join(FAKE_GPU_DEVICES[:NODE_GPUS])
        (etc / "gres.conf").write_text(f"AutoDetect=off\nNodeName=localhost Name=gpu File={devices}\n")
        dbd = etc / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports["dbd"]}
SlurmUser=root
LogFile={self.logs / "slurmdbd.log"}
PidFile={self.root / "run" / "slurmdbd.pid"}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports["mysql"]}
StorageUser=root
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read
        # The Snakemake jobstep plugin drops every SLURM_* variable but the job's identity before its
        # nested `srun`, SLURM_CONF included, so srun looks for /etc/slurm/slurm.conf: where a real
        # cluster keeps it. This cluster lives in a temp dir; an srun on PATH puts SLURM_CONF back.
        srun = self.bin / "srun"
        real = shutil.which("srun", path=os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != self.bin))
        srun.write_text(f"#!/bin/sh\nSLURM_CONF={self.conf} exec {real} \"$@\"\n")
        srun.chmod(0o755)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.stdout", "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)
        self.procs[name] = proc
        self._record_pids()
        return proc

    def _record_pids(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        (self.root / "pids.json").write_text(json.dumps(pids, indent=2) + "\n")

    def _wait(self, name: str, ready, deadline: float, log_file: Path | None = None) -> None:
        """Poll ``ready()`` until true; fail early if the daemon exited, naming its log."""
        while time.monotonic() < deadline:
            if ready():
                return
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.25)
        raise SlurmStartError(f"{name} did not come up; last log lines:\n{self._tail(name, log_file)}")

    def _tail(self, name: str, log_file: Path | None, lines: int = 25) -> str:
        text = []
        for path in (log_file, self.logs / f"{name}.stdout"):
            if path is not None and path.exists():
                text.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(text) or "(no log)"

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise SlurmStartError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _ok(self, argv: list[str]) -> bool:
        try:
            return self._run(argv, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _start_munge(self, deadline: float) -> None:
        d = self.root / "munge"
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={d / 'munge.key'}", f"--pid-file={d / 'munged.pid'}",
                               f"--seed-file={d / 'munged.seed'}", f"--log-file={self.logs / 'munged.log'}"])
        self._wait("munged", self.munge_socket.exists, deadline, self.logs / "munged.log")

    def _start_mariadb(self, deadline: float) -> None:
        data = self.root / "mysql"
        if not (data / "mysql").exists():
            self._run([_sbin("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                       "--auth-root-authentication-method=normal", "--skip-test-db"])
        self._spawn("mariadbd", [_sbin("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                                 f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1",
                                 f"--socket={data / 'mysqld.sock'}", f"--pid-file={data / 'mysqld.pid'}",
                                 f"--log-error={self.logs / 'mariadb.log'}",
                                 # slurmdbd's recommended minimums; small enough for a test machine
                                 "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900"])

        def accepting() -> bool:
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", self.ports["mysql"])) == 0

        self._wait("mariadbd", accepting, deadline, self.logs / "mariadb.log")

    def _start_slurmdbd(self, deadline: float) -> None:
        # slurmdbd reads the slurmdbd.conf that sits next to $SLURM_CONF
        self._spawn("slurmdbd", [_sbin("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self._ok(["sacctmgr", "-n", "-P", "list", "cluster"]), deadline,
                   self.logs / "slurmdbd.log")

    def _register_accounting(self) -> None:
        """The cluster, a test account and root's association in it (what sbatch -A checks)."""
        self._run(["sacctmgr", "-i", "add", "cluster", CLUSTER], check=False)  # exists on a restart
        self._run(["sacctmgr", "-i", "add", "account", ACCOUNT, f"cluster={CLUSTER}"], check=False)
        self._run(["sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT}", f"cluster={CLUSTER}"],
                  check=False)
        listed = self._run(["sacctmgr", "-n", "-P", "list", "assoc", "user=root", "format=account"]).stdout
        if ACCOUNT not in listed.split():
            raise SlurmStartError(f"sacctmgr: root has no association with account {ACCOUNT}: {listed!r}")

    def _start_slurmctld(self, deadline: float) -> None:
        # -i: ignore state left by a killed earlier run of this directory
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i"])
        self._wait("slurmctld", lambda: self._ok(["scontrol", "ping"]) and self._ok(["sinfo", "-h"]), deadline,
                   self.logs / "slurmctld.log")

    def _start_slurmd(self, deadline: float) -> None:
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", "localhost"])

        def idle() -> bool:
            proc = self._run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            return proc.returncode == 0 and "idle" in proc.stdout.split()

        self._wait("slurmd", idle, deadline, self.logs / "slurmd.log")

    # -- use --------------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, str]]:
        """Every job of this cluster from sacct (allocations only): id, name, comment, state, partition, TRES."""
        fields = ["JobIDRaw", "JobName", "Comment", "State", "Partition", "AllocTRES", "ReqTRES", "Account",
                  "Submit", "Start", "End"]
        out = self._run(["sacct", "-X", "-a", "-n", "-P", "--starttime", "now-1days", "--endtime", "now",
                         "-o", ",".join(f"{f}%200" for f in fields)]).stdout
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]

    def queue(self) -> list[dict[str, str]]:
        """Jobs slurmctld still knows (pending, running and finished within MinJobAge)."""
        out = self._run(["squeue", "-h", "--states=all", "-o", "%i|%j|%k|%T|%P|%b"]).stdout
        keys = ["JobID", "JobName", "Comment", "State", "Partition", "TresPerNode"]
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]

    def cancel_all(self, wait: float = 30.0) -> None:
        """Cancel every job of this cluster and wait until none is running."""
        self._run(["scancel", "--full", "-u", "root"], check=False)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            states = {j["State"] for j in self.queue()} if self._ok(["scontrol", "ping"]) else set()
            if not states & {"RUNNING", "PENDING", "COMPLETING", "CONFIGURING", "SUSPENDED"}:
                return
            time.sleep(0.5)
        log.warning("jobs still active after scancel: %s", self.queue())

    # -- tear-down --------------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        """Cancel jobs, then stop the daemons newest first: SIGTERM, then SIGKILL after ``grace``."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (SlurmStartError, subprocess.TimeoutExpired, OSError) as e:
                log.warning("cancelling jobs before tear-down failed: %s", e)
        for name in reversed(list(self.procs)):
            _terminate(self.procs[name].pid, grace, wait=self.procs[name].wait)
        self.procs.clear()
        self._record_pids()
        kill_job_leftovers(self.conf)


def job_processes(conf: Path) -> list[int]:
    """PIDs of processes inside a job of the cluster configured by ``conf``.

    proctrack/linuxproc follows parent PIDs only, so a job's process that lost its parent (a Snakemake
    job step after scancel) can outlive the job. Every job process inherits the submitter's
    SLURM_CONF, and Slurm adds SLURM_JOB_ID: the pair names this cluster's jobs and nothing else.
    """
    wanted = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted in env and any(v.startswith(b"SLURM_JOB_ID=") for v in env):
            found.append(int(entry.name))
    return found


def kill_job_leftovers(conf: Path) -> None:
    for pid in job_processes(conf):
        log.warning("killing pid %d, left over from a job of the test cluster", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _terminate(pid: int, grace: float, wait=None) -> None:
    """SIGTERM ``pid`` and wait up to ``grace`` s; SIGKILL if it is still there."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        if wait:
            wait()
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if wait is not None:
            try:
                wait(timeout=0.2)
                return
            except subprocess.TimeoutExpired:
                continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if wait is not None:
        wait()


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "up":
        cluster = SlurmCluster(root).start()
        # the daemons outlive this process; `down` stops them by the PIDs in pids.json
        for proc in cluster.procs.values():
            proc.returncode = 0  # keep Popen.__del__ quiet: we hand the PIDs over
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH")
        return 0
    pids_file = root / "pids.json"
    if not pids_file.exists():
        print(f"{pids_file}: missing (was the cluster started with `up {root}`?)", file=sys.stderr)
        return 1
    pids = json.loads(pids_file.read_text())
    env = dict(os.environ, SLURM_CONF=str(root / "etc" / "slurm.conf"))
    subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=60, check=False)
    time.sleep(2)
    for name in reversed(list(pids)):
        _terminate(int(pids[name]), 15.0)
    kill_job_leftovers(root / "etc" / "slurm.conf")
    pids_file.write_text("{}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(_main(sys.argv[1:]))
