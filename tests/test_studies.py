"""Real studies: workers as processes on a journal file and on PostgreSQL, killed workers, resume, pruning, failures,
MLflow parent/child runs, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from optstudy.cli import main as cli
from optstudy.errors import ConfigError
from optstudy.study import spec as specs
from optstudy.study.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def study_file(tmp_path, name="s", **fields) -> Path:
    content = {"name": name, "n_trials": 3, "seeds": [0], "sampler": {"name": "random", "seed": 0},
               "pruner": {"name": "none"}, "overrides": ["trainer.max_epochs=2"],
               "optimizers": {"adam": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def worker(path, storage, *args, **popen):
    return subprocess.Popen([sys.executable, "-m", "optstudy.cli", "study", "run", str(path), "--storage", storage,
                             *args], cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def trials(name, storage, states=None):
    return optuna.load_study(study_name=name, storage=open_storage(storage)[0]).get_trials(states=states)


def counts(name, storage):
    return {s: len(trials(name, storage, (s,))) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}


# --- study files --------------------------------------------------------------------------------------------------
def test_shipped_study_files_parse():
    sens = specs.load(ROOT / "studies" / "lr_sensitivity.yaml")
    assert len(sens.spaces) == 12 and len(sens.grid()) == 120 and sens.seeds == (0, 1, 2)
    bounds = specs.load(ROOT / "studies" / "bounds.yaml")
    assert set(bounds.spaces) == {"adabound", "amsbound"}
    assert bounds.defaults()[0] == {"optimizer": "adabound", "lr": 1e-3, "final_lr": 0.1, "bound": "hyperbolic",
                                    "bound.gamma": 1e-3}


@pytest.mark.parametrize("fields, message", [
    ({"optimizers": {"adm": {}}}, r"optimizers.adm: unknown optimizer; valid names: sgd, momentum"),
    ({"optimizers": {"sgd": {"beta1": [0.9]}}}, r"optimizers.sgd.beta1: sgd has no beta1"),
    ({"optimizers": {"adam": {"lr": {"low": 1, "high": 0.1}}}}, r"optimizers.adam.lr: low < high must hold, got "
                                                                 r"low=1, high=0.1"),
    ({"optimizers": {"adam": {"lr": {"low": 0, "high": 1, "log": True}}}}, r"a log range needs low > 0, got low=0"),
    ({"sampler": {"name": "grid"}}, r"sampler grid needs lists of values, but optimizers.adam.lr is a range"),
    ({"sampler": "cmaess"}, r"sampler.name must be one of tpe, random, grid, qmc, cmaes, got 'cmaess'"),
    ({"n_trials": 0}, r"n_trials must be an integer > 0, got 0"),
    ({"optimizers": {"adam": {"bound": ["hyperbolic"]}}}, r"only adabound and amsbound have bound schedules"),
    ({"trials": 3}, r"unknown key 'trials'; valid keys: direction, enqueue_defaults"),
])
def test_bad_study_files_are_named(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        specs.load(study_file(tmp_path, **fields))


def test_cli_bad_override_is_one_line(tmp_path, capsys):
    assert cli(["study", "run", str(study_file(tmp_path)), "trainer.max_epoch=1",
                "--storage", str(tmp_path / "j.journal")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "max_epoch" in err


# --- running ------------------------------------------------------------------------------------------------------
def test_two_workers_on_a_journal_file_share_the_budget(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "pair", n_trials=4)
    storage = str(tmp_path / "pair.journal")
    procs = [worker(path, storage) for _ in range(2)]
    outs = [finish(p) for p in procs]
    done = counts("pair", storage)
    assert 4 <= sum(done.values()) <= 5 and done[TrialState.FAIL] == 0  # at most one extra from the last race
    assert all("worker done" in out for out in outs)
    hosts = {t.user_attrs["worker"]["pid"] for t in trials("pair", storage)}
    assert len(hosts) == 2  # both worked


def test_grid_runs_every_point_once_with_seeds_and_parent_child_runs(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "grid", seeds=[0, 1], sampler={"name": "grid"},
                      optimizers={"adam": {"lr": [1e-3, 1e-2]}, "sgd": {"lr": [0.1]}})
    storage = str(tmp_path / "grid.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    done = trials("grid", storage, (TrialState.COMPLETE,))
    points = sorted((t.params["optimizer"], t.params["lr"]) for t in done)
    assert points == [("adam", 1e-3), ("adam", 1e-2), ("sgd", 0.1)]
    study = optuna.load_study(study_name="grid", storage=open_storage(storage)[0])
    client = MlflowClient(study.user_attrs["tracking_uri"])
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["optstudy.role"] == "study" and parent.data.params["study.sampler.name"] == "grid"
    for t in done:
        assert len(t.user_attrs["mlflow_run_ids"]) == 2 and t.value == pytest.approx(
            sum(t.user_attrs["seed_values"]) / 2)
        for seed, run_id in enumerate(t.user_attrs["mlflow_run_ids"]):
            run = client.get_run(run_id)
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert (run.data.tags["optuna.study"], run.data.tags["optuna.trial"]) == ("grid", str(t.number))
            assert (run.data.params["optimizer.name"], float(run.data.params["optimizer.lr"]),
                    run.data.params["seed"]) == (t.params["optimizer"], t.params["lr"], str(seed))
            assert run.data.metrics["val_loss"] == pytest.approx(t.user_attrs["seed_values"][seed])
    # re-running a finished grid study does nothing: no trial is repeated
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    assert len(trials("grid", storage)) == 3


def test_resume_keeps_completed_trials_and_defaults_come_first(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "resume", n_trials=3, optimizers={
        "adabound": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "final_lr": {"low": 0.01, "high": 1, "log": True}}})
    storage = str(tmp_path / "resume.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--n-trials", "1"]) == 0
    first = trials("resume", storage)
    assert len(first) == 1 and first[0].params == {"optimizer": "adabound", "lr": 1e-3, "final_lr": 0.1}
    assert cli(["study", "run", str(path), "--storage", storage]) == 0  # the same command resumes
    after = trials("resume", storage)
    assert len(after) == 3 and after[0].value == first[0].value and after[0].datetime_complete == first[0].datetime_complete


def test_pruning_stops_a_hopeless_configuration(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "prune", sampler={"name": "grid"}, overrides=["trainer.max_epochs=4"],
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                      optimizers={"adam": {"lr": [1e-2, 1e-7]}})
    storage = str(tmp_path / "prune.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    good, bad = sorted(trials("prune", storage), key=lambda t: -t.params["lr"])
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    assert max(bad.intermediate_values) == 0  # stopped after its first epoch
    run = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("prune").experiment_id],
        filter_string=f"tags.`optuna.trial` = '{bad.number}'")[0]
    assert run.info.status == "KILLED" and run.data.tags["optuna.pruned"] == "true"


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "fail", sampler={"name": "grid"}, overrides=[
        "trainer.max_epochs=1", "data=synthetic", "data.steps_per_epoch=20", "model=rosenbrock"],
        optimizers={"sgd": {"lr": [0.01, 1e-4]}})
    storage = str(tmp_path / "fail.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    by_lr = {t.params["lr"]: t for t in trials("fail", storage)}
    assert by_lr[0.01].state == TrialState.FAIL and "training diverged" in by_lr[0.01].user_attrs["fail_reason"]
    assert by_lr[1e-4].state == TrialState.COMPLETE


def _kill_first_running_trial(proc, name, storage, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if trials(name, storage, (TrialState.RUNNING,)):
                break
        except KeyError:
            pass  # not created yet
        time.sleep(0.5)
    else:
        raise AssertionError("no trial started")
    time.sleep(2)  # into its training
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_journal(tmp_path, mlflow_uri):
    # 60 epochs (~4 s): long enough to be killed mid-trial; the next worker has the same settings (the study's
    # identity: one with other overrides is refused)
    path = study_file(tmp_path, "killed", n_trials=2, overrides=["trainer.max_epochs=60"], enqueue_defaults=False)
    storage = str(tmp_path / "killed.journal")
    _kill_first_running_trial(worker(path, storage), "killed", storage)
    [dead] = trials("killed", storage, (TrialState.RUNNING,))
    finish(worker(path, storage))
    dead = trials("killed", storage)[dead.number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    retry = [t for t in trials("killed", storage) if t.user_attrs.get("retry_of") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == dead.params
    assert len(trials("killed", storage, (TrialState.COMPLETE,))) == 2  # the budget: the failure does not count


@pytest.mark.slow
def test_postgres_two_workers_and_a_killed_one_retried_by_heartbeat(tmp_path, mlflow_uri, postgres_url):
    name = f"pg{os.getpid()}{int(time.time())}"
    path = study_file(tmp_path, name, n_trials=4, overrides=["trainer.max_epochs=60"], enqueue_defaults=False)
    killed = worker(path, postgres_url, "--heartbeat", "1")
    _kill_first_running_trial(killed, name, postgres_url)
    time.sleep(3)  # past the grace period (2 heartbeats)
    procs = [worker(path, postgres_url, "--heartbeat", "1") for _ in range(2)]
    for p in procs:
        finish(p)
    every = trials(name, postgres_url)
    failed = [t for t in every if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the killed one: its process is gone from this host (else: its heartbeat goes stale)
    retried = [t for t in every if failed[0].number in (t.system_attrs.get("failed_trial"),
                                                        t.user_attrs.get("retry_of"))]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == failed[0].params
    pids = {t.number: (t.state.name, t.user_attrs["worker"]["pid"]) for t in every}
    assert {pid for state, pid in pids.values() if state == "COMPLETE"} - {killed.pid} == {p.pid for p in procs}
    assert len([t for t in every if t.state == TrialState.COMPLETE]) >= 4


def test_status_command(tmp_path, mlflow_uri, capsys):
    path = study_file(tmp_path, "stat", n_trials=1)
    storage = str(tmp_path / "stat.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    capsys.readouterr()
    assert cli(["study", "status", "stat", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study stat: 1 trials (1 complete); best #0: val_loss=") and "optimizer=adam lr=0.001" in out
    assert cli(["study", "status", "nope", "--storage", storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_ddp_trial_runs_train_py_as_its_own_process(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "ddpstudy", n_trials=1, enqueue_defaults=False, overrides=[
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1"])
    storage = str(tmp_path / "ddpstudy.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    [t] = trials("ddpstudy", storage)
    assert t.state == TrialState.COMPLETE, t.user_attrs.get("fail_reason")
    run = MlflowClient(mlflow_uri).get_run(t.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.trial"] == "0" and run.data.metrics["ddp/param_max_diff"] == 0.0
    assert run.data.metrics["val_loss"] == pytest.approx(t.value)


def test_report_command_writes_the_page_and_logs_it_to_the_parent_run(tmp_path, mlflow_uri, capsys):
    path = study_file(tmp_path, "rep", seeds=[0, 1], sampler={"name": "grid"},
                      optimizers={"adam": {"lr": [1e-3, 1e-2]}, "momentum": {"lr": [0.1]}})
    storage = str(tmp_path / "rep.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    assert cli(["study", "report", "rep", "--storage", storage, "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "adam" in page and "momentum" in page and page.count("<img") >= 4
    study = optuna.load_study(study_name="rep", storage=open_storage(storage)[0])
    client = MlflowClient(study.user_attrs["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(study.user_attrs["mlflow_parent_run_id"], "report")}
    assert {"report/index.html", "report/robustness.csv"} <= logged


@pytest.mark.slow
def test_a_terminated_workers_trial_is_queued_again(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "term", n_trials=1, overrides=["trainer.max_epochs=60"], enqueue_defaults=False)
    storage = str(tmp_path / "term.journal")
    proc = worker(path, storage)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not _running(storage, "term"):
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)  # scancel, pre-emption, docker stop
    proc.wait(timeout=120)
    [stopped, queued] = trials("term", storage)
    assert stopped.state == TrialState.FAIL and "worker stopped" in stopped.user_attrs["fail_reason"]
    assert queued.state == TrialState.WAITING and queued.user_attrs["retry_of"] == stopped.number
    finish(worker(path, storage))
    assert trials("term", storage)[queued.number].state == TrialState.COMPLETE
    assert trials("term", storage)[queued.number].params == stopped.params


def _running(storage, name):
    try:
        return bool(trials(name, storage, (TrialState.RUNNING,)))
    except KeyError:
        return False


@pytest.mark.parametrize("sampler, pruner", [("qmc", "hyperband"), ("tpe", "median"), ("random", "none")])
def test_each_sampler_and_pruner_runs_a_study(tmp_path, mlflow_uri, sampler, pruner):
    name = f"{sampler}-{pruner}"
    path = study_file(tmp_path, name, n_trials=2, sampler={"name": sampler, "seed": 1}, pruner={"name": pruner},
                      enqueue_defaults=False, optimizers={
                          "adam": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "beta2": [0.99, 0.999]},
                          "momentum": {"lr": {"low": 1e-3, "high": 1.0, "log": True},
                                       "momentum": {"low": 0.5, "high": 0.99}}})
    storage = str(tmp_path / f"{name}.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    done = trials(name, storage)
    assert len(done) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in done)
    study = optuna.load_study(study_name=name, storage=open_storage(storage)[0])
    assert study.user_attrs["spec"]["sampler"]["name"] == sampler


def test_report_of_a_study_without_tracking(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the worker then passes the study's store on: logger=none lacks the key
    path = study_file(tmp_path, "untracked", n_trials=2, enqueue_defaults=False, overrides=[
        "trainer.max_epochs=1", "logger=none"])
    storage = str(tmp_path / "untracked.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    assert cli(["study", "report", "untracked", "--storage", storage, "--out", str(tmp_path / "out")]) == 0
    assert "untracked" in (tmp_path / "out" / "index.html").read_text()


# --- a study's identity -------------------------------------------------------------------------------------------
def test_a_worker_with_other_overrides_is_refused_and_status_states_the_budget(tmp_path, capsys):
    """A later worker without the first one's ``trainer.max_epochs=1`` used to add 2-epoch trials to a 1-epoch
    study, where they became "best"; the stored spec did not show the override."""
    path, storage = study_file(tmp_path, n_trials=1), str(tmp_path / "j.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "trainer.max_epochs=1", "logger=none"]) == 0
    capsys.readouterr()
    assert cli(["study", "run", str(path), "--storage", storage, "logger=none", "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_epochs: study 1, this worker 2" in err and "trainer.max_epochs=1" in err
    assert len(trials("s", storage)) == 1  # nothing added, nothing lost
    # the same overrides join (logger settings do not shape a trial)
    assert cli(["study", "run", str(path), "--storage", storage, "trainer.max_epochs=1", "logger=none"]) == 0
    capsys.readouterr()
    assert cli(["study", "status", "s", "--storage", storage]) == 0
    assert "budget: mlp on digits, 1 epochs, seeds 0 (overrides: trainer.max_epochs=1 logger=none)" in \
        capsys.readouterr().out


def test_a_changed_study_file_is_refused(tmp_path, capsys):
    path, storage = study_file(tmp_path, n_trials=1), str(tmp_path / "j.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "logger=none"]) == 0
    study_file(tmp_path, n_trials=1, seeds=[0, 1])
    assert cli(["study", "run", str(path), "--storage", storage, "logger=none"]) == 2
    assert "this study file differs" in capsys.readouterr().err


def test_a_study_started_before_a_key_existed_goes_on_with_the_key_at_its_default(tmp_path, capsys):
    """Every new config key (data.order, trainer.delay, ...) joined the recorded identity of new studies, and a
    worker of the upgraded optstudy refused every study started before it: "(unset)" never equals the default."""
    import optuna

    from optstudy.study.storage import open_storage

    path, storage = study_file(tmp_path, n_trials=2), str(tmp_path / "j.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "trainer.max_epochs=1", "logger=none",
                "--n-trials", "1"]) == 0
    study = optuna.load_study(study_name="s", storage=open_storage(storage)[0])
    old = {k: v for k, v in study.user_attrs["identity"].items() if k not in ("data.order", "trainer.delay")}
    study.set_user_attr("identity", old)  # as an older optstudy recorded it
    capsys.readouterr()
    # the new key set otherwise shapes trials differently: refused, named
    assert cli(["study", "run", str(path), "--storage", storage, "trainer.max_epochs=1", "logger=none",
                "data.order=fixed", "--n-trials", "1"]) == 2
    assert "data.order: study (unset), this worker fixed" in capsys.readouterr().err
    # at its default: the study goes on
    assert cli(["study", "run", str(path), "--storage", storage, "trainer.max_epochs=1", "logger=none",
                "--n-trials", "1"]) == 0
    assert len(trials("s", storage)) == 2  # it joined and ran the second trial
