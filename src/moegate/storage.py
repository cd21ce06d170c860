"""Optuna storage for the tuning studies, and recovery of trials whose worker died.

Two kinds, chosen by ``tuning.storage``:

- ``null``: a journal file, ``<results>/tuning/optuna.journal`` (``JournalFileBackend`` with
  ``JournalFileOpenLock``: an ``O_EXCL`` lock file, safe on NFSv3+/GPFS). Right for one node, or a
  few workers on a shared file system. It has no heartbeat of its own, so each worker records its
  host and PID on its trial and refreshes a heartbeat attribute; :func:`recover_stale_trials` fails a
  RUNNING trial whose worker is gone (same host, PID dead) or silent for ``grace_period_s``, and
  re-queues its parameters.
- an RDB URL (``postgresql+psycopg://user@host:5432/db``): right for many nodes. The password never
  sits in the config: it comes from the environment variable ``tuning.password_env``, or else libpq
  reads ``PGPASSWORD`` / ``~/.pgpass`` itself. Optuna's own heartbeat (``heartbeat_interval``,
  ``grace_period``) with ``RetryHeartbeatStaleTrialCallback`` fails and re-queues stale trials.

Logs and reports only ever show :func:`describe` (the URL with the password as ``***``).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from moegate.config import ConfigError
from moegate.layout import Layout

log = logging.getLogger(__name__)

OWNER_KEY = "moegate.worker"  # trial user attr: {worker, host, pid, slurm_job_id}
HEARTBEAT_KEY = "moegate.heartbeat"  # trial system attr: unix time of the worker's last heartbeat
STALE_KEY = "moegate.stale"  # trial user attr: why recovery failed the trial
SCHEMA_RACE_RETRIES = 6  # attempts at creating the RDB tables while other workers do the same


@dataclass(frozen=True)
class StorageSettings:
    """The ``tuning`` keys that decide where trials live and when a running trial counts as stale."""

    url: str | None  # None = the journal file
    journal: Path
    password_env: str
    heartbeat_interval: int
    grace_period: int
    max_retries: int | None

    @classmethod
    def from_config(cls, config: dict) -> StorageSettings:
        tuning = config["tuning"]
        url = tuning["storage"]
        if url is not None:
            _check_url(url)
        if tuning["grace_period_s"] <= tuning["heartbeat_interval_s"]:
            raise ConfigError(f"tuning.grace_period_s ({tuning['grace_period_s']}) must exceed "
                              f"tuning.heartbeat_interval_s ({tuning['heartbeat_interval_s']})")
        return cls(url=url, journal=Layout.from_config(config).journal, password_env=tuning["password_env"],
                   heartbeat_interval=tuning["heartbeat_interval_s"], grace_period=tuning["grace_period_s"],
                   max_retries=tuning["max_retries"])

    @property
    def is_journal(self) -> bool:
        return self.url is None


def _check_url(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"tuning.storage: {url!r} is not a database URL "
                          "(expected e.g. postgresql+psycopg://user@host:5432/db, or null for the journal file)") from None
    if parsed.password is not None:
        raise ConfigError(f"tuning.storage: {mask_url(url)} holds a password; remove it from the config and "
                          "set it in the environment (tuning.password_env, PGPASSWORD) or ~/.pgpass")


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, for logs and reports."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable storage URL>"


def describe(config: dict) -> str:
    """Where the trials live, safe to log: ``journal:<path>`` or the masked RDB URL."""
    url = config["tuning"]["storage"]
    return f"journal:{Layout.from_config(config).journal}" if url is None else mask_url(url)


def study_name(config: dict, study: str) -> str:
    """The study's fixed name, ``<prefix>.<results dir name>.<study>``: a rerun of the run continues it."""
    results = Path(config["results"]).resolve().name
    return f"{config['tuning']['study_prefix']}.{results}.{study}"


def open_storage(config: dict) -> optuna.storages.BaseStorage:
    """The run's Optuna storage (journal file or RDB with heartbeat), ready for create/load_study."""
    settings = StorageSettings.from_config(config)
    if settings.is_journal:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        settings.journal.parent.mkdir(parents=True, exist_ok=True)
        path = str(settings.journal)
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    return _open_rdb(settings)


def _rdb_url(settings: StorageSettings) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(settings.url)
    password = os.environ.get(settings.password_env)
    if password:  # else libpq falls back to PGPASSWORD and ~/.pgpass by itself
        url = url.set(password=password)
    return url.render_as_string(hide_password=False)


def _open_rdb(settings: StorageSettings) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeat; retries while several workers create the tables of an empty database."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    shown = mask_url(settings.url)
    for attempt in range(1, SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat, its callback
                return optuna.storages.RDBStorage(
                    _rdb_url(settings),
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=settings.max_retries),
                )
        except (IntegrityError, ProgrammingError) as e:
            # another worker created the same tables/types a moment earlier ("duplicate key ... pg_type"):
            # they exist now, so the next attempt only checks them
            if attempt == SCHEMA_RACE_RETRIES:
                raise RuntimeError(f"storage {shown}: cannot create Optuna's tables after {attempt} attempts: "
                                   f"{type(e).__name__}: {_first_line(e, settings)}") from None
            log.info("storage %s: table creation raced with another worker (%s); retrying", shown,
                     type(e).__name__)
            time.sleep(random.uniform(0.1, 0.5) * attempt)
        except SQLAlchemyError as e:  # connection refused, authentication failed, no such database
            raise RuntimeError(f"storage {shown}: cannot open: {type(e).__name__}: {_first_line(e, settings)} "
                               f"(password from ${settings.password_env}, PGPASSWORD or ~/.pgpass)") from None
    raise AssertionError("unreachable")


def _first_line(error: Exception, settings: StorageSettings) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    password = os.environ.get(settings.password_env)
    return text.replace(password, "***") if password else text


# -- who runs a trial, and when a running trial is stale ------------------------------------------

def worker_identity(worker_index: int) -> dict:
    """This process as a trial owner: worker index, host, PID and the Slurm job (if any)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"worker": worker_index, "host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job}


def claim(trial: optuna.Trial, worker_index: int, journal: bool) -> None:
    """Record this process as the owner of a just-asked ``trial`` (replacing an owner copied onto a retry).

    The first heartbeat goes first: an RDB trial without any heartbeat is never stale for Optuna, so a
    worker killed before it would leave the trial RUNNING; :func:`stale_trials` catches that case by
    the missing owner.
    """
    beat(trial.storage, trial._trial_id, journal)
    trial.set_user_attr(OWNER_KEY, worker_identity(worker_index))


def beat(storage: optuna.storages.BaseStorage, trial_id: int, journal: bool) -> None:
    """One heartbeat: a system attribute on the journal file, Optuna's heartbeat table on an RDB."""
    if journal:
        storage.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
    else:
        storage.record_heartbeat(trial_id)


class Heartbeat:
    """Refresh the trial's heartbeat every ``interval`` seconds while the objective runs.

    The thread stops before the trial is told its result, so it never writes to a finished trial.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float, journal: bool):
        self._storage, self._trial_id, self._interval, self._journal = storage, trial_id, interval, journal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                beat(self._storage, self._trial_id, self._journal)
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # another worker declared us stale and failed the trial: nothing left to refresh

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a killed child not yet reaped is dead


def stale_reason(trial: FrozenTrial, now: float, host: str, grace_period: float,
                 alive=process_alive) -> str | None:
    """Why a RUNNING trial of the journal storage is stale, or None while its worker may still run it.

    Stale when its owner ran on this host and that PID is gone, or when the later of its heartbeat and
    its start is older than ``grace_period`` seconds (owner on another host, or not recorded yet).
    """
    if trial.state != TrialState.RUNNING:
        return None
    owner = trial.user_attrs.get(OWNER_KEY) or {}
    pid = owner.get("pid")
    if owner.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not alive(pid):
        return f"worker {owner.get('worker')} (pid {pid} on {host}) is gone"
    last = trial.system_attrs.get(HEARTBEAT_KEY)
    started = trial.datetime_start.timestamp() if trial.datetime_start else None
    seen = max((t for t in (last, started) if t is not None), default=None)
    if seen is not None and now - seen > grace_period:
        who = f"worker {owner.get('worker')} on {owner.get('host')}" if owner else "an unrecorded worker"
        return f"no heartbeat from {who} for {now - seen:.0f} s (grace period {grace_period} s)"
    return None


def stale_trials(study: optuna.Study, settings: StorageSettings) -> list[tuple[FrozenTrial, str]]:
    """The study's RUNNING trials that no live worker runs any more, each with the reason.

    RDB: Optuna's heartbeat bookkeeping (no heartbeat for ``grace_period``). Journal: the owner and
    heartbeat attributes (:func:`stale_reason`).
    """
    storage = study._storage
    host, now = socket.gethostname(), time.time()
    if not settings.is_journal:
        ids = set(storage._get_stale_trial_ids(study._study_id))  # the heartbeat query fail_stale_trials uses
        found = [(storage.get_trial(i), f"no heartbeat for {settings.grace_period} s") for i in sorted(ids)]
        for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
            # killed between ask and its first heartbeat: no heartbeat row, so Optuna never calls it stale
            if trial._trial_id not in ids and OWNER_KEY not in trial.user_attrs and trial.datetime_start and \
                    now - trial.datetime_start.timestamp() > settings.grace_period:
                found.append((trial, f"never claimed by a worker in {settings.grace_period} s"))
        return found
    found = []
    for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, now, host, settings.grace_period)
        if reason is not None:
            found.append((trial, reason))
    return found


def recover_stale_trials(study: optuna.Study, settings: StorageSettings, requeue: bool = True) -> list[int]:
    """Fail the study's stale RUNNING trials and (``requeue``) queue their params again; their numbers.

    Two workers recovering at once are safe: a finished trial cannot be failed again, so only the
    worker whose FAIL lands first re-queues. A re-queued trial keeps Optuna's retry history
    (``RetryHeartbeatStaleTrialCallback``, at most ``max_retries`` times) but not the dead owner.
    """
    storage = study._storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retries)
    failed = []
    for trial, reason in stale_trials(study, settings):
        try:
            storage.set_trial_user_attr(trial._trial_id, STALE_KEY, reason)
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile, or another worker recovered it first
        failed.append(trial.number)
        retries = len(trial.system_attrs.get("retry_history", []))  # earlier re-runs of these params
        again = requeue and (settings.max_retries is None or retries < settings.max_retries)
        log.warning("study %s: trial %d is stale (%s): failed%s", study.study_name, trial.number, reason,
                    ", params re-queued" if again else ", params not re-run")
        if again:
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (OWNER_KEY, STALE_KEY)}
            trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_KEY}
            retry(study, trial)
    return failed
