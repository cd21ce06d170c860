"""moegate.stages.tune: shared studies, the exact budget across workers, kills and reruns, collect and the
λ rule.

Worker processes run this file as a script with a cheap sleep-based objective (no model training);
one test at the end runs the real backbone objective on a tiny model.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO, write_config
from optuna.trial import TrialState

from moegate.config import ConfigError, load
from moegate.errors import MoegateError
from moegate.stages.tune import (
    RELEASED_KEY,
    StudySpec,
    admitted,
    budget_counts,
    collect,
    create,
    make_sampler,
    sampler_seed,
    suggest,
    with_params,
    worker,
)
from moegate.stages.tune.workers import _Worker
from moegate.storage import OWNER_KEY, STALE_KEY, open_storage, study_name
from moegate.studies import choose_lambda, pareto_front

SPACE = {
    "backbone.learning_rate": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
    "backbone.batch_size": {"type": "categorical", "choices": [16, 32]},
}


def _config_path(tmp_path: Path, n_trials: int = 3, storage: str | None = None, **tuning) -> Path:
    return write_config(tmp_path, tuning={
        "storage": storage, "wait_s": 0.1, "heartbeat_interval_s": 1, "grace_period_s": 3,
        "backbone": {"n_trials": n_trials, "pruner": "none", "search_space": SPACE}, **tuning})


def sleepy_objective(config: dict, trial) -> dict:
    """Sleeps MOEGATE_TEST_SLEEP seconds; accuracy peaks at learning rate 1e-4."""
    time.sleep(float(os.environ.get("MOEGATE_TEST_SLEEP", "0.05")))
    lr = config["backbone"]["learning_rate"]
    return {"val_accuracy": 1.0 - abs(math.log10(lr) + 4.0) / 10.0, "val_loss": abs(math.log10(lr) + 4.0),
            "epochs": 1, "curves": [{"epoch": 1}]}


def paired_objective(config: dict, trial) -> dict:
    """sleepy_objective, but a trial ends only once a worker other than MOEGATE_TEST_WORKER has a trial
    inside its objective or complete (read from the storage; 120 s at most, a safety net only): every
    worker then completes at least one trial, however late it started."""
    me = int(os.environ["MOEGATE_TEST_WORKER"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = _trials(config)
        if any((t.user_attrs.get(OWNER_KEY) or {}).get("worker") not in (None, me)
               and (t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.params))
               for t in trials):
            break
        time.sleep(0.1)
    return sleepy_objective(config, trial)


def lambda_objective(config: dict, trial) -> dict:
    """Larger λ: fewer layers, a little less accuracy."""
    lam = config["router"]["ponder_cost"]
    return {"val_accuracy": 0.9 - 0.05 * lam, "val_mean_layers": 6.0 - 5.0 * lam ** 0.5,
            "val_accuracy_full_depth": 0.9, "val_nll": 0.3}


def _spawn(config_path: Path, index: int, sleep: float, env: dict | None = None,
           objective: str = "sleepy") -> subprocess.Popen:
    """A worker process on the backbone study with the ``objective`` of this file (sleepy or paired)."""
    return subprocess.Popen([sys.executable, __file__, str(config_path), "backbone", str(index)],
                            env={**os.environ, **(env or {}), "MOEGATE_TEST_SLEEP": str(sleep),
                                 "MOEGATE_TEST_OBJECTIVE": objective, "MOEGATE_TEST_WORKER": str(index)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


def _trials(config: dict, study: str = "backbone") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name(config, study), storage=open_storage(config)).get_trials()


def _states(trials) -> dict[str, int]:
    return {s.name: n for s in TrialState if (n := sum(t.state == s for t in trials))}


def _wait_for_running(config: dict, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if any(t.state == TrialState.RUNNING and t.params for t in _trials(config)):
                return  # inside the objective: its params are set
        except (KeyError, FileNotFoundError):
            pass  # the study does not exist yet
        time.sleep(0.2)
    raise AssertionError("no trial started within the timeout")


# -- the study spec -----------------------------------------------------------------------------------

def test_search_space_and_pruner_errors_name_the_key(tmp_path):
    def spec(**backbone):
        config = load(write_config(tmp_path, tuning={"backbone": {"search_space": SPACE, **backbone}}))
        return StudySpec.from_config(config, "backbone")

    assert spec().prunable and spec().metrics == ("val_accuracy",)
    with pytest.raises(ConfigError, match="tuning.backbone.search_space.backbone.learnig_rate: the config has no"):
        spec(search_space={"backbone.learnig_rate": {"type": "float", "low": 0.1, "high": 0.2}})
    with pytest.raises(ConfigError, match="is a config section"):
        spec(search_space={"router.head": {"type": "categorical", "choices": [1]}})
    with pytest.raises(ConfigError, match="log range needs low > 0"):
        spec(search_space={"backbone.dropout": {"type": "float", "low": 0.0, "high": 0.2, "log": True}})
    with pytest.raises(ConfigError, match="low .* is above high"):
        spec(search_space={"backbone.epochs": {"type": "int", "low": 5, "high": 2}})
    with pytest.raises(ConfigError, match="pruner: median prunes on per-epoch val_accuracy"):
        spec(metric="val_loss", direction="minimize")
    assert not spec(metric="val_loss", direction="minimize", pruner="none").prunable
    with pytest.raises(ConfigError, match="search_space: empty"):
        spec(search_space={})
    with pytest.raises(ConfigError, match="unknown study"):
        StudySpec.from_config(load(write_config(tmp_path)), "heads")
    lam = StudySpec.from_config(load(write_config(tmp_path)), "lambda")
    assert lam.metrics == ("val_accuracy", "val_mean_layers") and lam.directions == ("maximize", "minimize")
    assert lam.multi_objective and not lam.prunable


def test_suggested_params_overlay_the_config_with_their_types(tmp_path):
    config = load(write_config(tmp_path))
    space = {**config["tuning"]["submodels"]["search_space"], **SPACE,
             "backbone.epochs": {"type": "int", "low": 2, "high": 6, "step": 2}}
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    params = suggest(trial, space)
    assert set(params) == set(space)
    tuned = with_params(config, params)
    assert tuned["router"]["head"]["batch_norm"] in (False, True)
    assert isinstance(tuned["router"]["head"]["depth"], int) and tuned["backbone"]["epochs"] in (2, 4, 6)
    assert 1e-5 <= tuned["backbone"]["learning_rate"] <= 1e-3
    assert config["backbone"]["learning_rate"] == 5.0e-5  # the input config is untouched


# -- the budget on hand-made trial sets ---------------------------------------------------------------

def _t(number: int, state: TrialState) -> optuna.trial.FrozenTrial:
    now = datetime.datetime.now()
    return optuna.trial.FrozenTrial(
        number=number, trial_id=number, state=state, value=1.0 if state == TrialState.COMPLETE else None,
        values=None, datetime_start=now, datetime_complete=now if state.is_finished() else None, params={},
        distributions={}, user_attrs={}, system_attrs={}, intermediate_values={})


def test_admission_counts_complete_and_the_running_or_waiting_trials_ahead():
    C, R, W, F, P = TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL, TrialState.PRUNED
    trials = [_t(0, C), _t(1, F), _t(2, P), _t(3, R), _t(4, R)]
    assert budget_counts(trials) == (1, 2)
    assert admitted(trials, 3, n_trials=2)  # 1 complete + nothing running ahead of it
    assert not admitted(trials, 4, n_trials=2)  # trial 3 holds the last slot
    assert admitted(trials, 4, n_trials=3)
    # a queued retry numbered below counts as taken: whoever pops it may run it
    assert not admitted([_t(0, C), _t(1, W), _t(2, R)], 2, n_trials=2)
    assert admitted([_t(0, C), _t(1, W), _t(2, R)], 1, n_trials=2)
    # the highest-numbered of any admitted set sees all the others: never more than the budget
    for n in range(1, 5):
        runs = [_t(i, R) for i in range(6)]
        assert sum(admitted(runs, t.number, n) for t in runs) == n


# -- Pareto front and the λ rule ----------------------------------------------------------------------

def test_a_killed_trial_retried_leaves_the_next_draws_as_an_uninterrupted_run():
    """fault_sweep found it: a rerun seeded by the count of all trials drew other points after the
    retry. Seeded by the trials sampled (a retry samples nothing), the draws match."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def draw(study):
        study.sampler = make_sampler("tpe", sampler_seed(7, 0, study.get_trials(deepcopy=False)))
        trial = study.ask()
        return trial, trial.suggest_float("lr", 1e-5, 1e-2, log=True)

    reference = optuna.create_study()
    points = []
    for _ in range(3):
        trial, lr = draw(reference)
        points.append(lr)
        reference.tell(trial, lr)

    killed = optuna.create_study()
    trial, lr = draw(killed)
    assert lr == points[0]
    killed.tell(trial, state=TrialState.FAIL)  # the stale trial, failed by recovery ...
    killed.enqueue_trial({"lr": lr})  # ... and its params queued again, marked as a retry
    retry = killed.get_trials(deepcopy=False)[-1]
    killed._storage.set_trial_system_attr(retry._trial_id, "failed_trial", trial.number)
    for expected in points:
        trial, lr = draw(killed)
        assert lr == expected
        killed.tell(trial, lr)


def test_pareto_front_on_hand_made_points():
    points = [(0.90, 6.0), (0.90, 4.0), (0.88, 3.0), (0.85, 3.5), (0.80, 1.0), (0.80, 1.0), (0.95, 5.5)]
    # (0.90, 6.0) is dominated by (0.90, 4.0); (0.85, 3.5) by (0.88, 3.0); equal points do not dominate each other
    assert pareto_front(points) == [1, 2, 4, 5, 6]
    assert pareto_front([]) == []


def _rows(points):
    return [{"trial": i, "router.ponder_cost": 0.01 * (i + 1), "val_accuracy": a, "val_mean_layers": m}
            for i, (a, m) in enumerate(points)]


def test_lambda_rule_fewest_layers_within_the_tolerance():
    rows = _rows([(0.900, 6.0), (0.897, 4.0), (0.896, 3.0), (0.890, 2.0), (0.950, 5.8), (0.947, 5.0)])
    assert choose_lambda(rows, tolerance=0.005)["trial"] == 5  # 0.947 is within 0.5 points of 0.950
    assert choose_lambda(rows, tolerance=0.0)["trial"] == 4
    assert choose_lambda(rows, tolerance=0.1)["trial"] == 3
    # ties on layers: the higher accuracy, then the lower trial number
    tie = _rows([(0.90, 3.0), (0.91, 3.0), (0.91, 3.0)])
    assert choose_lambda(tie, tolerance=0.05)["trial"] == 1
    for tol in (0.0, 0.004, 0.005, 0.02, 1.0):  # the chosen trial is always on the front
        chosen = choose_lambda(rows, tol)
        assert rows.index(chosen) in pareto_front([(r["val_accuracy"], r["val_mean_layers"]) for r in rows])
    with pytest.raises(ValueError, match="no completed trials"):
        choose_lambda([], 0.005)


# -- one worker in this process -----------------------------------------------------------------------

def test_worker_meets_the_budget_collect_writes_the_best_and_a_rerun_continues(tmp_path):
    config = load(_config_path(tmp_path, n_trials=3))
    assert create(config, "backbone") == "moegate.results.backbone"
    summary = worker(config, "backbone", 0, objective=sleepy_objective)
    assert summary["n_complete"] == 3 and summary["ran"] == {"complete": 3}
    out = collect(config, "backbone")
    saved = json.loads((tmp_path / "results" / "tuning" / "backbone.json").read_text())
    assert saved["params"] == out["params"] and set(saved["params"]) == set(SPACE)
    assert saved["study"] == "moegate.results.backbone" and saved["storage"].startswith("journal:")
    assert saved["n_complete"] == 3 and saved["states"] == {"COMPLETE": 3}
    best = max(saved["trials"], key=lambda t: t["values"][0])
    assert saved["best_trial"] == best["number"] and saved["best_value"] == best["values"][0]
    assert saved["trials"][0]["worker"]["pid"] == os.getpid()
    assert saved["trials"][0]["metrics"]["val_loss"] >= 0  # scalar fit results are kept; curves are not
    assert optuna.load_study(study_name=saved["study"], storage=open_storage(config)).metric_names == [
        config["tuning"]["backbone"]["metric"]]  # named in optuna-dashboard
    assert "curves" not in saved["trials"][0]["metrics"]
    # the budget is met: a rerun adds nothing; a larger budget continues the same study
    assert worker(config, "backbone", 1, objective=sleepy_objective)["ran"] == {}
    bigger = load(_config_path(tmp_path, n_trials=5))
    assert worker(bigger, "backbone", 0, objective=sleepy_objective)["ran"] == {"complete": 2}
    assert _states(_trials(bigger)) == {"COMPLETE": 5}


def test_a_changed_search_space_is_refused_on_the_same_study(tmp_path):
    config = load(_config_path(tmp_path, n_trials=1))
    worker(config, "backbone", 0, objective=sleepy_objective)
    changed = load(write_config(tmp_path, tuning={"backbone": {
        "n_trials": 2, "pruner": "none", "search_space": {"backbone.dropout": {"type": "float", "low": 0, "high": 0.5}}}}))
    with pytest.raises(ConfigError, match="set tuning.study_prefix to start a new study"):
        worker(changed, "backbone", 0, objective=sleepy_objective)


def test_n_trials_zero_collects_a_note_without_any_storage(tmp_path):
    config = load(write_config(tmp_path, tuning={"backbone": {"n_trials": 0}, "lambda": {"n_trials": 0}}))
    assert worker(config, "backbone", 0)["ran"] == {}
    for study in ("backbone", "lambda"):
        out = collect(config, study)
        assert out["params"] == {} and "config's values stand" in out["note"]
    tuning = tmp_path / "results" / "tuning"
    assert not (tuning / "optuna.journal").exists()
    assert (tuning / "lambda_pareto.csv").read_text().startswith("trial,router.ponder_cost,val_accuracy")
    assert (tuning / "lambda_pareto.png").stat().st_size > 1000


def test_collect_refuses_an_unfinished_study(tmp_path):
    config = load(_config_path(tmp_path, n_trials=2))
    with pytest.raises(RuntimeError, match="not found .* run its workers first"):
        collect(config, "backbone")
    worker(load(_config_path(tmp_path, n_trials=1)), "backbone", 0, objective=sleepy_objective)
    with pytest.raises(RuntimeError, match="1 of 2 trials complete"):
        collect(config, "backbone")


def test_a_worker_gives_up_after_max_failures_in_a_row(tmp_path):
    config = load(_config_path(tmp_path, n_trials=2, max_failures=2))

    def broken(config, trial):
        raise FloatingPointError("loss is nan")

    with pytest.raises(RuntimeError, match="2 trials .* failed in a row .* FloatingPointError: loss is nan"):
        worker(config, "backbone", 0, objective=broken)
    trials = _trials(config)
    assert _states(trials) == {"FAIL": 2}
    assert trials[0].user_attrs["moegate.error"] == "FloatingPointError: loss is nan"


def test_a_trial_over_the_budget_is_released_and_a_refused_retry_queued_again(tmp_path):
    config = load(_config_path(tmp_path, n_trials=1))
    spec = StudySpec.from_config(config, "backbone")
    w = _Worker(config, spec, 0, sleepy_objective)
    study = w.study = optuna.create_study(study_name=study_name(config, "backbone"), storage=open_storage(config),
                                          direction="maximize")
    holder = study.ask()  # another live worker's trial holds the only slot
    study.enqueue_trial({"backbone.learning_rate": 1e-4, "backbone.batch_size": 32})
    assert w._run_trial(study.ask()) == ("released", None)  # pops the queued params: refused
    assert w._run_trial(study.ask()) == ("released", None)  # the params were queued again
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert RELEASED_KEY in trials[1].user_attrs and RELEASED_KEY in trials[2].user_attrs
    assert trials[3].system_attrs["fixed_params"] == {"backbone.learning_rate": 1e-4, "backbone.batch_size": 32}
    study.tell(holder, 0.5)
    assert budget_counts(study.get_trials()) == (1, 0)


def test_lambda_study_writes_the_front_and_the_chosen_lambda(tmp_path):
    config = load(write_config(tmp_path, tuning={"lambda": {"n_trials": 6, "sampler": "random"}}))
    worker(config, "lambda", 0, objective=lambda_objective)
    out = collect(config, "lambda")
    st = optuna.load_study(study_name=out["study"], storage=open_storage(config))
    assert st.metric_names == ["val_accuracy", "val_mean_layers"]  # both objectives named in optuna-dashboard
    csv = (tmp_path / "results" / "tuning" / "lambda_pareto.csv").read_text().splitlines()
    assert csv[0] == "trial,router.ponder_cost,val_accuracy,val_mean_layers,val_accuracy_full_depth,val_nll,pareto,chosen"
    assert len(csv) == 7 and sum(line.endswith(",True") for line in csv) == 1  # one chosen row
    rows = [{"trial": t["number"], "val_accuracy": t["values"][0], "val_mean_layers": t["values"][1]}
            for t in out["trials"]]
    expected = choose_lambda(rows, 0.005)
    assert out["chosen"]["trial"] == expected["trial"]
    assert out["params"] == {"router.ponder_cost": out["chosen"]["router.ponder_cost"]}
    assert len(out["pareto"]) == 6  # this objective trades accuracy for layers monotonically
    assert (tmp_path / "results" / "tuning" / "lambda_pareto.png").stat().st_size > 1000


# -- several worker processes -------------------------------------------------------------------------

def test_two_concurrent_workers_on_the_journal_file_finish_exactly_the_budget(tmp_path):
    path = _config_path(tmp_path, n_trials=6)
    config = load(path)
    # paired: a worker's trial waits for the other worker's first trial, so both win one however late
    # the second process starts (on a busy machine one worker could otherwise take all six)
    outputs = _finish([_spawn(path, i, sleep=0.3, objective="paired") for i in range(2)])
    trials = _trials(config)
    assert _states(trials) in ({"COMPLETE": 6}, {"COMPLETE": 6, "FAIL": 1}, {"COMPLETE": 6, "FAIL": 2})
    assert all(RELEASED_KEY in t.user_attrs for t in trials if t.state == TrialState.FAIL)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # one consistent journal
    workers = {t.user_attrs[OWNER_KEY]["worker"] for t in trials if t.state == TrialState.COMPLETE}
    assert workers == {0, 1}, outputs


def _kill_mid_trial_then_rerun(path: Path, env: dict | None = None) -> tuple[list, str]:
    config = load(path)
    victim = _spawn(path, 0, sleep=120, env=env)
    _wait_for_running(config, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert [t.state for t in _trials(config)] == [TrialState.RUNNING]  # what a killed worker leaves
    out = _finish([_spawn(path, 0, sleep=0.05, env=env)])[0]
    return _trials(config), out


def test_journal_worker_killed_mid_trial_then_rerun_ends_exact_with_nothing_running(tmp_path):
    trials, out = _kill_mid_trial_then_rerun(_config_path(tmp_path, n_trials=3))
    assert "is stale" in out
    assert _states(trials) == {"COMPLETE": 3, "FAIL": 1}
    killed = trials[0]
    assert killed.state == TrialState.FAIL and "is gone" in killed.user_attrs[STALE_KEY]
    retry = trials[1]  # same host, dead PID: recovered at once, so the retry runs first
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.system_attrs["failed_trial"] == 0


@pytest.mark.postgres
def test_two_concurrent_workers_on_an_empty_postgres_finish_exactly_the_budget(tmp_path, postgres):
    path = _config_path(tmp_path, n_trials=6, storage=postgres.database())
    env = {"MOEGATE_DB_PASSWORD": postgres.password}
    outputs = _finish([_spawn(path, i, sleep=0.3, env=env) for i in range(2)])  # nobody created the study first
    os.environ["MOEGATE_DB_PASSWORD"] = postgres.password
    try:
        trials = _trials(load(path))
    finally:
        del os.environ["MOEGATE_DB_PASSWORD"]
    assert _states(trials)["COMPLETE"] == 6 and "RUNNING" not in _states(trials)
    assert all(RELEASED_KEY in t.user_attrs for t in trials if t.state == TrialState.FAIL)
    for out in outputs:
        assert postgres.password not in out


@pytest.mark.postgres
def test_postgres_worker_killed_mid_trial_then_rerun_ends_exact_with_nothing_running(tmp_path, postgres,
                                                                                     monkeypatch):
    path = _config_path(tmp_path, n_trials=3, storage=postgres.database(), grace_period_s=2)
    monkeypatch.setenv("MOEGATE_DB_PASSWORD", postgres.password)
    trials, out = _kill_mid_trial_then_rerun(path)
    states = _states(trials)
    assert states["COMPLETE"] == 3 and states["FAIL"] == 1 and "RUNNING" not in states
    assert trials[0].state == TrialState.FAIL
    # its params ran again once its heartbeat went stale (the rerun waited for that before exiting)
    assert any(t.state == TrialState.COMPLETE and t.params == trials[0].params for t in trials[1:])
    assert postgres.password not in out


# -- the real objective ---------------------------------------------------------------------------------

def test_backbone_study_with_the_real_objective_on_a_tiny_model(tiny_run, caplog):
    caplog.set_level(logging.INFO, logger="moegate.stages.tune")
    config = tiny_run
    config["tuning"]["backbone"].update(n_trials=2, search_space={
        "backbone.learning_rate": {"type": "float", "low": 5.0e-4, "high": 2.0e-3, "log": True},
        "backbone.epochs": {"type": "int", "low": 1, "high": 2}})
    summary = worker(config, "backbone", 0)
    out = collect(config, "backbone")
    assert summary["n_complete"] == 2 and out["n_complete"] == 2
    assert 0.0 <= out["best_value"] <= 1.0 and out["best_metrics"]["val_accuracy"] == out["best_value"]
    assert set(out["params"]) == {"backbone.learning_rate", "backbone.epochs"}


def test_lambda_study_with_the_real_router_objective_on_a_tiny_model(tiny_run):
    from moegate.stages.train_backbone import train_backbone

    config = tiny_run
    train_backbone(config)  # the router studies train on the (tuned) backbone
    config["tuning"]["lambda"]["n_trials"] = 2
    worker(config, "lambda", 0)
    out = collect(config, "lambda")
    assert out["n_complete"] == 2 and set(out["params"]) == {"router.ponder_cost"}
    assert 1.0 <= out["chosen"]["val_mean_layers"] <= 3.0  # the tiny backbone has 3 layers
    assert {"val_accuracy_full_depth", "val_nll"} <= set(out["chosen"])
    csv = (Path(config["results"]) / "tuning" / "lambda_pareto.csv").read_text().splitlines()
    assert len(csv) == 3


# -- the registry of studies and the command line ----------------------------------------------------

def test_the_study_registry_is_a_topological_order_every_reader_shares():
    from moegate import studies
    from moegate.stages.train_router import TUNED_STUDIES

    assert studies.NAMES == ("backbone", "submodels", "training", "lambda")
    for i, study in enumerate(studies.STUDIES):
        assert set(study.after) <= set(studies.NAMES[:i]), f"{study.name} runs after a later or unknown study"
        assert studies.overlaid_before(study.name) == studies.NAMES[:i]
        assert len(study.metrics) == len(study.directions)
    assert TUNED_STUDIES == studies.NAMES
    assert studies.trained_by("backbone") + studies.trained_by("router") == studies.NAMES
    assert [s.name for s in studies.STUDIES if s.pareto] == ["lambda"]
    with pytest.raises(MoegateError, match="unknown study 'nonsense'; expected one of backbone, submodels"):
        studies.get("nonsense")


def test_the_rules_see_the_registry_studies(tmp_path):
    """The dry run of the workflow: one tune_create, tune_worker and collect job per registered study."""
    from moegate import studies

    (tmp_path / "data").symlink_to(REPO / "data")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                           "-d", str(tmp_path), "--configfile", str(REPO / "config.yaml")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rule in ("tune_create", "tune_worker"):
        shown = set(re.findall(rf"rule {rule}:\n(?:.*\n)*?\s+wildcards: study=(\w+)", proc.stdout))
        assert shown == set(studies.NAMES), rule
    collected = set(re.findall(r"output: results/tuning/(\w+)\.json", proc.stdout))
    assert collected == set(studies.NAMES)


def test_cli_version_help_and_one_line_errors(tmp_path):
    from typer.main import get_command
    from typer.testing import CliRunner

    from moegate import __version__
    from moegate.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.strip() == f"moegate {__version__}"
    commands = get_command(app)
    for path, command in _commands(commands, ["moegate"]):
        undocumented = [p.name for p in command.params if p.name != "help" and not getattr(p, "help", None)]
        assert not undocumented, f"{' '.join(path)}: options without help: {undocumented}"
        assert runner.invoke(app, [*path[1:], "--help"]).exit_code == 0, path
    for action in ("create", "worker", "collect"):
        assert "backbone, submodels, training, lambda" in runner.invoke(app, ["tune", action, "--help"]).output
    config = write_config(tmp_path)
    for argv, message in ((["tune", "worker", "nonsense"], "error: unknown study 'nonsense'; expected one of"),
                          (["tune", "backbone", "--worker", "0"], "error: moegate tune: no action 'backbone'")):
        result = runner.invoke(app, [*argv, "--config", str(config)])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith(message)


def _commands(command, path):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, [*path, name])


def test_tune_commands_run_create_worker_collect(tmp_path):
    """The rules' three commands on a study with n_trials 0 (no storage, no training): what each writes."""
    from typer.testing import CliRunner

    from moegate.cli import app

    config = write_config(tmp_path, tuning={"training": {"n_trials": 0}})
    runner = CliRunner()
    for argv in (["create", "training"], ["worker", "training", "--index", "1"], ["collect", "training"]):
        result = runner.invoke(app, ["tune", *argv, "--config", str(config)])
        assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results" / "tuning" / "training.json").read_text())
    assert saved["params"] == {} and saved["n_trials"] == 0


def _main(argv: list[str]) -> None:
    """Worker process: ``python tests/test_tune.py CONFIG STUDY INDEX`` with the sleep-based objective."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path, study, index = argv
    objectives = {"sleepy": sleepy_objective, "paired": paired_objective}
    objective = objectives[os.environ.get("MOEGATE_TEST_OBJECTIVE", "sleepy")]
    if study == "lambda":
        objective = lambda_objective
    worker(load(config_path), study, int(index), objective=objective)


if __name__ == "__main__":
    _main(sys.argv[1:])
