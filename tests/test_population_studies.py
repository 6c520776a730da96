"""Population studies (``population: K``, ``--population K``): K trials asked at once and trained as populations,
each still an ordinary trial and MLflow run."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from optstudy.cli import main as cli
from optstudy.study.storage import open_storage
from tests.test_studies import study_file, trials

GRID = {"adam": {"lr": [1e-3, 1e-2, 10.0]}, "momentum": {"lr": [0.01, 0.1]}}


def _run(tmp_path, name, population, **fields):
    path = study_file(tmp_path, name, seeds=[0, 1], sampler={"name": "grid"}, overrides=["trainer.max_epochs=2"],
                      optimizers=GRID, **fields)
    storage = str(tmp_path / f"{name}.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", str(population)]) == 0
    return storage


def test_a_population_study_equals_the_one_at_a_time_study(tmp_path, mlflow_uri):
    """How equivalence is judged: every configuration's value (the mean over its seeds) equals the one-at-a-time
    study's within 1e-5 relative (the members equal their standalone runs; float32 rounding is ~1e-7), far inside
    the seed noise (the two seeds differ by ~1e-2); a diverging configuration fails in both."""
    one = {t.params["optimizer"] + str(t.params["lr"]): t for t in trials("one", _run(tmp_path, "one", 1))}
    many = {t.params["optimizer"] + str(t.params["lr"]): t for t in trials("many", _run(tmp_path, "many", 8))}
    assert one.keys() == many.keys() and len(many) == 5
    for key, t in many.items():
        assert t.state == one[key].state, key
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(one[key].value, rel=1e-5), key
            assert t.user_attrs["seed_values"] == pytest.approx(one[key].user_attrs["seed_values"], rel=1e-5)
        else:
            assert "diverged" in t.user_attrs["fail_reason"]
    spread = [abs(a - b) for a, b in (t.user_attrs["seed_values"] for t in one.values() if t.value is not None)]
    assert max(spread) > 1e-3  # the seed noise the tolerance is far inside


def test_each_member_is_an_ordinary_trial_with_its_runs(tmp_path, mlflow_uri):
    storage = _run(tmp_path, "runs", 8)
    study = optuna.load_study(study_name="runs", storage=open_storage(storage)[0])
    client = MlflowClient(mlflow_uri)
    populations = set()
    for t in study.get_trials():
        assert len(t.user_attrs["mlflow_run_ids"]) == 2 and t.user_attrs["population_members"]
        populations.add(t.user_attrs["population"])
        for seed, run_id in zip([0, 1], t.user_attrs["mlflow_run_ids"]):
            run = client.get_run(run_id)
            assert run.data.tags["optuna.trial"] == str(t.number) and run.data.tags["seed"] == str(seed)
            assert float(run.data.params["optimizer.lr"]) == t.params["lr"]
            assert run.data.tags["mlflow.parentRunId"] == t.user_attrs["population"]
        if t.state == TrialState.COMPLETE:
            assert len(t.intermediate_values) == 4  # 2 epochs x 2 seeds, at the one-at-a-time steps
    assert len(populations) == 2  # one per optimizer
    for parent in populations:  # each population nests under the study's parent run
        tags = client.get_run(parent).data.tags
        assert tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]


def test_the_report_is_the_same_with_populations(tmp_path, mlflow_uri):
    reports = {}
    for name, k in (("rep1", 1), ("rep8", 8)):
        storage = _run(tmp_path, name, k)
        assert cli(["study", "report", name, "--storage", storage, "--out", str(tmp_path / name)]) == 0
        reports[name] = pd.read_csv(tmp_path / name / "lr_sensitivity.csv")
    a, b = (r.sort_values(list(r.columns[:2])).reset_index(drop=True) for r in reports.values())
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for column in a.columns:
        if pd.api.types.is_numeric_dtype(a[column]):
            assert ((a[column] - b[column]).abs() <= 1e-5 * a[column].abs() + 1e-12).all() or \
                (a[column].isna() == b[column].isna()).all() and math.isnan(a[column].sum()), column
        else:
            assert (a[column] == b[column]).all(), column


def test_hyperband_prunes_within_a_population(tmp_path, mlflow_uri):
    """Hyperband compares trials at the same step, running ones included: members are pruned mid-population."""
    path = study_file(tmp_path, "hb", n_trials=8, seeds=[0], sampler={"name": "random", "seed": 3},
                      pruner={"name": "hyperband", "reduction_factor": 2}, overrides=["trainer.max_epochs=6"],
                      enqueue_defaults=False, optimizers={"sgd": {"lr": {"low": 1e-5, "high": 1.0, "log": True}}})
    storage = str(tmp_path / "hb.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", "8"]) == 0
    done = trials("hb", storage)
    assert len(done) == 8 and len({t.user_attrs["population"] for t in done}) == 1
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert pruned and all(len(t.intermediate_values) < 6 for t in pruned)
    assert any(t.state == TrialState.COMPLETE for t in done)


def test_tpe_asks_k_distinct_points(tmp_path, mlflow_uri):
    path = study_file(tmp_path, "tpe", n_trials=6, seeds=[0], sampler={"name": "tpe", "seed": 0},
                      enqueue_defaults=False, overrides=["trainer.max_epochs=1"],
                      optimizers={"adam": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}})
    storage = str(tmp_path / "tpe.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", "3"]) == 0
    done = trials("tpe", storage)
    assert len(done) == 6 and len({t.params["lr"] for t in done}) == 6
    assert len({t.user_attrs["population"] for t in done}) == 2  # 3 at a time


def test_a_bad_population_value_is_refused(tmp_path, capsys):
    path = study_file(tmp_path, "bad", population=0)
    assert cli(["study", "run", str(path), "--storage", str(tmp_path / "b.journal")]) == 2
    assert "bad.yaml: population must be an integer > 0, got 0" in capsys.readouterr().err
    assert cli(["study", "run", str(study_file(tmp_path, "ok")), "--storage", str(tmp_path / "b.journal"),
                "--population", "-2"]) == 2
    assert "--population must be an integer > 0, got -2" in capsys.readouterr().err


def test_a_worker_killed_mid_population_leaves_every_trial_to_retry(tmp_path, mlflow_uri):
    """Journal file: the next worker sees the dead process's RUNNING trials, fails them and queues each again;
    nothing is lost and nothing runs twice."""
    from tests.test_studies import _kill_first_running_trial, finish, worker

    path = study_file(tmp_path, "killedpop", seeds=[0], sampler={"name": "grid"}, overrides=["trainer.max_epochs=60"],
                      optimizers={"adam": {"lr": [1e-3, 3e-3, 1e-2]}})
    storage = str(tmp_path / "killedpop.journal")
    _kill_first_running_trial(worker(path, storage, "--population", "3"), "killedpop", storage)
    dead = trials("killedpop", storage, (TrialState.RUNNING,))
    assert len(dead) == 3  # the whole population was running
    finish(worker(path, storage, "--population", "3"))
    done = trials("killedpop", storage)
    for t in dead:
        assert done[t.number].state == TrialState.FAIL and "died" in done[t.number].user_attrs["fail_reason"]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [1e-3, 3e-3, 1e-2]  # each point once
    assert all(t.user_attrs.get("retry_of") in {d.number for d in dead} for t in complete)


def test_median_prunes_only_against_finished_trials(tmp_path, mlflow_uri):
    """The median pruner compares with finished trials: nothing is pruned in the first population (its trials run
    together), a hopeless trial of the next one is, after its first epoch, its run ended KILLED."""
    path = study_file(tmp_path, "med", sampler={"name": "grid"}, overrides=["trainer.max_epochs=4"],
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                      optimizers={"adam": {"lr": [1e-2, 1e-7, 3e-3, 1e-8]}})
    storage = str(tmp_path / "med.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", "2"]) == 0
    first, second = sorted(trials("med", storage), key=lambda t: t.number)[:2], \
        sorted(trials("med", storage), key=lambda t: t.number)[2:]
    assert all(t.state == TrialState.COMPLETE for t in first)  # lr 1e-7 too: nothing finished to compare with
    hopeless = next(t for t in second if t.params["lr"] == 1e-8)
    assert hopeless.state == TrialState.PRUNED and max(hopeless.intermediate_values) == 0
    run = MlflowClient(mlflow_uri).get_run(hopeless.user_attrs["mlflow_run_ids"][0])
    assert run.info.status == "KILLED" and "pruned" in run.data.tags["failure_reason"]
    assert run.data.tags["optuna.pruned"] == "true"  # as a pruned one-at-a-time trial's run


def test_percentile_prunes_only_against_finished_trials(tmp_path, mlflow_uri):
    """Like the median pruner: nothing is pruned within the first population, the hopeless trial of the next one
    is (worse than the best 25% of the finished trials after its first epoch)."""
    path = study_file(tmp_path, "pct", sampler={"name": "grid"}, overrides=["trainer.max_epochs=3"],
                      pruner={"name": "percentile", "n_startup_trials": 1, "n_warmup_steps": 0},
                      optimizers={"adam": {"lr": [1e-2, 1e-7, 3e-3, 1e-8]}})
    storage = str(tmp_path / "pct.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", "2"]) == 0
    done = sorted(trials("pct", storage), key=lambda t: t.number)
    assert all(t.state == TrialState.COMPLETE for t in done[:2])
    hopeless = next(t for t in done[2:] if t.params["lr"] == 1e-8)
    assert hopeless.state == TrialState.PRUNED and max(hopeless.intermediate_values) == 0


def test_successive_halving_prunes_within_a_population(tmp_path, mlflow_uri):
    """Successive halving, as Hyperband, compares trials that reported at the same step, running ones included."""
    path = study_file(tmp_path, "sha", n_trials=8, seeds=[0], sampler={"name": "random", "seed": 3},
                      pruner={"name": "successive_halving", "reduction_factor": 2}, overrides=["trainer.max_epochs=4"],
                      enqueue_defaults=False, optimizers={"sgd": {"lr": {"low": 1e-5, "high": 1.0, "log": True}}})
    storage = str(tmp_path / "sha.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", "8"]) == 0
    done = trials("sha", storage)
    assert len(done) == 8 and len({t.user_attrs["population"] for t in done}) == 1
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert pruned and all(len(t.intermediate_values) < 4 for t in pruned)
    best = min((t for t in done if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert all(t.value is None or t.value >= best.value for t in done)


def test_cmaes_asks_k_points_of_one_generation(tmp_path, mlflow_uri):
    """CMA-ES: K asks draw K points from the current search distribution (popsize = K: one generation a
    population). Its search space is what finished trials share, so the first population is drawn at random and
    the second is generation 0."""
    path = study_file(tmp_path, "cma", n_trials=8, seeds=[0], sampler={"name": "cmaes", "seed": 0, "popsize": 4},
                      enqueue_defaults=False, overrides=["trainer.max_epochs=1"],
                      optimizers={"adam": {"lr": {"low": 1e-4, "high": 1e-1, "log": True},
                                           "beta1": {"low": 0.5, "high": 0.95}}})
    storage = str(tmp_path / "cma.journal")
    assert cli(["study", "run", str(path), "--storage", storage, "--population", "4"]) == 0
    done = sorted(trials("cma", storage), key=lambda t: t.number)
    assert len(done) == 8 and all(t.state == TrialState.COMPLETE for t in done)
    assert len({t.user_attrs["population"] for t in done}) == 2
    assert len({(t.params["lr"], t.params["beta1"]) for t in done}) == 8
    generations = [t.system_attrs.get("cma:generation") for t in done]
    assert generations[:4] == [None] * 4 and generations[4:] == [0] * 4


def test_the_deepobs_protocol_study_file():
    from tests.test_studies import ROOT
    from optstudy.study import spec as specs

    study = specs.load(ROOT / "studies" / "deepobs_protocol.yaml")
    lrs = study.spaces["adam"].params[0].choices
    assert len(study.spaces) == 12 and len(study.grid()) == 432 and len(study.seeds) == 10
    assert len(lrs) == 36 and min(lrs) == 1e-5 and max(lrs) == 100.0 and study.population == 36


def test_postgres_a_killed_population_is_retried_by_heartbeat(tmp_path, mlflow_uri, postgres_url):
    """Asked trials beat while their population trains (Optuna beats only for study.optimize): killed, they go
    stale and another worker fails and retries every one of them, even one that had nothing left to ask and was
    waiting for them (before, it left them RUNNING for good once it was the last worker)."""
    import os
    import signal
    import time

    from tests.test_studies import finish, worker

    name = f"pgpop{os.getpid()}{int(time.time())}"
    path = study_file(tmp_path, name, seeds=[0], sampler={"name": "grid"}, overrides=["trainer.max_epochs=150"],
                      optimizers={"adam": {"lr": [1e-3, 1e-2]}})
    first = worker(path, postgres_url, "--heartbeat", "1", "--population", "2")
    while not (_exists(name, postgres_url) and trials(name, postgres_url, (TrialState.RUNNING,))):
        time.sleep(0.5)
    second = worker(path, postgres_url, "--heartbeat", "1", "--population", "2")
    try:
        lines = []
        while not lines or "waiting for other workers' running trials" not in lines[-1]:
            lines.append(second.stdout.readline())
            assert lines[-1], f"the second worker never waited: {''.join(lines)}"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finish(second)
    every = trials(name, postgres_url)
    failed = [t for t in every if t.state == TrialState.FAIL]
    assert len(failed) == 2  # the whole killed population, failed by the heartbeat check
    complete = [t for t in every if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [1e-3, 1e-2]


def _exists(name, storage) -> bool:
    return name in optuna.get_all_study_names(open_storage(storage)[0])


def test_postgres_a_trial_whose_worker_died_right_after_asking_is_retried(tmp_path, mlflow_uri, postgres_url):
    """A worker killed between Optuna's ask and its first write leaves a RUNNING trial that never beat and names no
    worker: the heartbeat check skips it, so it counts as stale once it is older than two heartbeats (10 s at
    least); the last worker retries it instead of leaving it RUNNING (or waiting on it for ever)."""
    import os
    import time

    from tests.test_studies import finish, worker

    name = f"pgask{os.getpid()}{int(time.time())}"
    path = study_file(tmp_path, name, seeds=[0], sampler={"name": "grid"}, overrides=["trainer.max_epochs=1"],
                      optimizers={"adam": {"lr": [1e-3, 1e-2]}})
    finish(worker(path, postgres_url, "--heartbeat", "1", "--n-trials", "1"))
    study = optuna.load_study(study_name=name, storage=open_storage(postgres_url)[0])
    orphan = study.ask()  # the second grid point, as a worker killed right after asking leaves it
    time.sleep(10)
    finish(worker(path, postgres_url, "--heartbeat", "1", "--population", "2"))
    every = trials(name, postgres_url)
    assert every[orphan.number].state == TrialState.FAIL
    assert "died before naming itself" in every[orphan.number].user_attrs["fail_reason"]
    assert sorted(t.params["lr"] for t in every if t.state == TrialState.COMPLETE) == [1e-3, 1e-2]
