"""moegate.storage: journal file or PostgreSQL, masked URLs, and recovery of trials whose worker died."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
from conftest import write_config
from optuna.trial import TrialState

from moegate.config import ConfigError, load
from moegate.storage import (
    HEARTBEAT_KEY,
    OWNER_KEY,
    STALE_KEY,
    StorageSettings,
    describe,
    mask_url,
    open_storage,
    process_alive,
    recover_stale_trials,
    stale_reason,
    study_name,
)

HOST = socket.gethostname()
SPACE = optuna.distributions.FloatDistribution(0.0, 1.0)


def _config(tmp_path, **tuning):
    return load(write_config(tmp_path, tuning={"heartbeat_interval_s": 1, "grace_period_s": 3, **tuning}))


def _running(owner: dict | None = None, heartbeat: float | None = None, age_s: float = 0.0) -> optuna.trial.FrozenTrial:
    start = datetime.datetime.now() - datetime.timedelta(seconds=age_s)
    return optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=TrialState.RUNNING, value=None, values=None, datetime_start=start,
        datetime_complete=None, params={}, distributions={}, intermediate_values={},
        user_attrs={OWNER_KEY: owner} if owner else {},
        system_attrs={HEARTBEAT_KEY: heartbeat} if heartbeat is not None else {})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- URLs, names, settings ---------------------------------------------------------------------------

def test_mask_url_hides_the_password():
    assert mask_url("postgresql+psycopg://alice:s3cret@db:5432/optuna") == "postgresql+psycopg://alice:***@db:5432/optuna"
    assert mask_url("postgresql+psycopg://alice@db/optuna") == "postgresql+psycopg://alice@db/optuna"


def test_a_password_in_the_config_is_refused_without_echoing_it(tmp_path):
    url = "postgresql+psycopg://alice:s3cret@db/optuna"
    with pytest.raises(ConfigError, match="tuning.storage") as err:  # when the config loads: nothing written yet
        _config(tmp_path, storage=url)
    assert "s3cret" not in str(err.value)
    config = _config(tmp_path)
    config["tuning"]["storage"] = url  # a config changed after loading is checked again when the storage opens
    with pytest.raises(ConfigError, match="tuning.storage") as err:
        StorageSettings.from_config(config)
    assert "s3cret" not in str(err.value)
    assert "***" in str(err.value)


def test_not_a_url_and_a_short_grace_period_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a database URL"):
        StorageSettings.from_config(_config(tmp_path, storage="some/file.journal"))
    with pytest.raises(ConfigError, match="grace_period_s"):
        StorageSettings.from_config(_config(tmp_path, heartbeat_interval_s=5, grace_period_s=5))


def test_study_names_are_fixed_by_the_run(tmp_path):
    config = _config(tmp_path, study_prefix="lab")
    assert study_name(config, "lambda") == "lab.results.lambda"
    assert describe(config) == f"journal:{tmp_path / 'results' / 'tuning' / 'optuna.journal'}"


# -- stale trials ------------------------------------------------------------------------------------

def test_process_alive_sees_reaped_and_zombie_children_as_dead():
    assert process_alive(os.getpid())
    assert not process_alive(_dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # exited but not reaped yet
        with open(f"/proc/{zombie.pid}/stat") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                break
        time.sleep(0.05)
    try:
        assert not process_alive(zombie.pid)
    finally:
        zombie.wait()


def test_stale_reason_on_hand_made_trials():
    now = time.time()
    alive = lambda pid: pid == 4242
    me = {"worker": 0, "host": HOST, "pid": 4242}
    gone = {"worker": 1, "host": HOST, "pid": 999999}
    elsewhere = {"worker": 2, "host": "other-node", "pid": 4242}
    # same host: a dead PID is stale at once, however fresh its heartbeat
    assert "is gone" in stale_reason(_running(gone, heartbeat=now), now, HOST, 60, alive)
    assert stale_reason(_running(me, heartbeat=now), now, HOST, 60, alive) is None
    # another host (PID unknowable): stale only when silent longer than the grace period
    assert stale_reason(_running(elsewhere, heartbeat=now - 30, age_s=300), now, HOST, 60, alive) is None
    assert "no heartbeat" in stale_reason(_running(elsewhere, heartbeat=now - 90, age_s=300), now, HOST, 60, alive)
    # a live PID with an old heartbeat (PID reused, or the worker hung) is stale too
    assert "no heartbeat" in stale_reason(_running(me, heartbeat=now - 90, age_s=300), now, HOST, 60, alive)
    # not claimed yet: judged by its start time
    assert stale_reason(_running(None, age_s=5), now, HOST, 60, alive) is None
    assert "unrecorded worker" in stale_reason(_running(None, age_s=90), now, HOST, 60, alive)


def _journal_study(config) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=open_storage(config), load_if_exists=True)


def _orphan(study: optuna.Study, x: float, owner: dict) -> int:
    """A RUNNING trial with param x owned by ``owner``, as a killed worker leaves it."""
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.storage.set_trial_param(trial._trial_id, "x", x, SPACE)
    trial.set_user_attr(OWNER_KEY, owner)
    trial.storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_KEY, time.time())
    return trial.number


def test_journal_recovery_fails_a_dead_workers_trial_and_requeues_its_params(tmp_path):
    config = _config(tmp_path)
    settings = StorageSettings.from_config(config)
    study = _journal_study(config)
    dead = _orphan(study, 0.25, {"worker": 0, "host": HOST, "pid": _dead_pid()})
    live = _orphan(study, 0.75, {"worker": 1, "host": HOST, "pid": os.getpid() + 0})
    # a second handle on the same file, as a second worker has: only one of them requeues
    other = _journal_study(config)
    assert recover_stale_trials(study, settings) == [dead]
    assert recover_stale_trials(other, settings) == []
    trials = study.get_trials()
    assert trials[dead].state == TrialState.FAIL and "is gone" in trials[dead].user_attrs[STALE_KEY]
    assert trials[live].state == TrialState.RUNNING  # our own PID: never judged by liveness
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1
    assert waiting[0].params == {"x": 0.25}
    assert waiting[0].system_attrs["failed_trial"] == dead
    assert OWNER_KEY not in waiting[0].user_attrs and HEARTBEAT_KEY not in waiting[0].system_attrs
    popped = study.ask()  # the next worker runs the same params again
    assert popped.number == waiting[0].number and popped.suggest_float("x", 0.0, 1.0) == 0.25


def test_params_stale_more_than_max_retries_times_are_not_rerun(tmp_path):
    config = _config(tmp_path, max_retries=1)
    settings = StorageSettings.from_config(config)
    study = _journal_study(config)
    first = _orphan(study, 0.5, {"worker": 0, "host": HOST, "pid": _dead_pid()})
    assert recover_stale_trials(study, settings) == [first]
    retry = study.ask()  # the one allowed re-run, and its worker dies too
    retry.set_user_attr(OWNER_KEY, {"worker": 0, "host": HOST, "pid": _dead_pid()})
    assert recover_stale_trials(study, settings) == [retry.number]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert study.get_trials()[1].system_attrs["retry_history"] == [first]


def test_journal_recovery_without_requeue(tmp_path):
    config = _config(tmp_path)
    study = _journal_study(config)
    dead = _orphan(study, 0.5, {"worker": 0, "host": HOST, "pid": _dead_pid()})
    assert recover_stale_trials(study, StorageSettings.from_config(config), requeue=False) == [dead]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


# -- PostgreSQL --------------------------------------------------------------------------------------

@pytest.mark.postgres
def test_postgres_password_from_the_environment_never_logged(tmp_path, postgres, monkeypatch, caplog):
    url = postgres.database()
    config = _config(tmp_path, storage=url, password_env="MOEGATE_TEST_DB_PASSWORD")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("MOEGATE_TEST_DB_PASSWORD", postgres.password)
    caplog.set_level(logging.DEBUG)
    study = optuna.create_study(study_name=study_name(config, "backbone"), storage=open_storage(config))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert describe(config) == url
    assert postgres.password not in caplog.text
    # a wrong password fails with the masked URL in the message, not the password
    monkeypatch.setenv("MOEGATE_TEST_DB_PASSWORD", "wrong-" + postgres.password)
    with pytest.raises(RuntimeError, match="cannot open") as err:
        open_storage(config)
    assert postgres.password not in str(err.value)


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_postgres_recovery_by_heartbeat(tmp_path, postgres, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres.password)  # libpq reads it itself
    config = _config(tmp_path, storage=postgres.database())
    settings = StorageSettings.from_config(config)
    study = optuna.create_study(study_name="s", storage=open_storage(config))
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.storage.record_heartbeat(trial._trial_id)  # then the worker dies: no more heartbeats
    unclaimed = study.ask()  # a worker killed right after ask, before its first heartbeat
    assert recover_stale_trials(study, settings) == []  # both still within the grace period
    time.sleep(settings.grace_period + 1.5)
    assert recover_stale_trials(study, settings) == [trial.number, unclaimed.number]
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 2 and states.count(TrialState.WAITING) == 2
    assert states.count(TrialState.RUNNING) == 0


SCHEMA_RACE = """
import sys, optuna
from moegate.config import load
from moegate.storage import open_storage
config = load(sys.argv[1])
optuna.create_study(study_name="race", storage=open_storage(config), load_if_exists=True)
print("ok")
"""


@pytest.mark.postgres
def test_two_workers_opening_an_empty_postgres_at_once(tmp_path, postgres):
    path = write_config(tmp_path, tuning={"storage": postgres.database()})
    env = {**os.environ, "MOEGATE_DB_PASSWORD": postgres.password}
    procs = [subprocess.Popen([sys.executable, "-c", SCHEMA_RACE, str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    for (out, err), p in zip(results, procs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == "ok"
        assert postgres.password not in err
