"""A population's MLflow runs, read back through the MLflow client: a parent, one child per member with the params and
tags a standalone run of its config has, each member's curves in its own run, a member ended early while the others
go on, artifacts on the right run, and a server that goes away (undelivered metrics kept in files)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optstudy.config import compose
from optstudy.errors import ConfigError
from optstudy.population.tracking import PopulationLogger
from optstudy.tracking import TrackingUnavailable, flatten
from optstudy.train import _resolved, make_logger, run_name

ROOT = Path(__file__).resolve().parents[2]
K, STEPS, DIVERGES = 4, 30, 12


def member(k: int, name: str | None = None) -> dict:
    params = {"optimizer": {"name": "adam", "lr": 10.0 ** -(k + 1), "betas": [0.9, 0.999]}, "seed": k,
              "model": {"name": "mlp", "hidden": [64]}, "tags": {}}
    return {"run_name": name or f"adam lr={params['optimizer']['lr']:g} seed={k}",
            "tags": {"optimizer": "adam", "model": "mlp", "study": None}, "params": params}


def history(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def population(mlflow_uri, tmp_path_factory):
    """K members over STEPS steps; member 2 diverges at step DIVERGES and is ended FAILED with an artifact of its own,
    the others go on and end FINISHED with the parent's artifact."""
    files = tmp_path_factory.mktemp("artifacts")
    (files / "m2.txt").write_text("member 2")
    (files / "config.yaml").write_text("population: 4")
    threads = sum(t.name == "optstudy-mlflow-sender" for t in threading.enumerate())
    members = [member(k) for k in range(K)]
    members[3]["run_name"] = members[0]["run_name"]  # a repeated name within the population
    start = time.perf_counter()
    log = PopulationLogger(mlflow_uri, "population-tracking", "population adam", {"purpose": "test"}, members)
    created = time.perf_counter() - start
    senders = sum(t.name == "optstudy-mlflow-sender" for t in threading.enumerate()) - threads
    log.log_hyperparams({"population": {"size": K}})
    for step in range(1, STEPS + 1):
        log.log_member_metrics({k: {"train_loss": k + step / 100} for k in range(K)}, step)
        if step % 10 == 0:
            log.log_member_metrics({k: {"val_loss": k + step / 10, "val_acc": 0.5} for k in range(K)}, step)
            log.log_metrics({"epoch": step // 10 - 1}, step)
        if step == DIVERGES:
            log.close_member(2, "FAILED", f"diverged at step {DIVERGES}", artifacts=[files / "m2.txt"])
    log.close(artifacts=[files / "config.yaml"])
    return log, members, created, senders


def test_a_parent_and_one_child_per_member_with_its_params_tags_and_a_unique_name(population, mlflow_uri):
    log, members, created, senders = population
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(log.parent_run_id)
    assert (parent.info.run_name, parent.data.tags["purpose"], parent.data.tags["population.size"]) == (
        "population adam", "test", str(K))
    assert parent.data.params == {"population.size": str(K)}  # Lightning's log_hyperparams
    names = []
    for k, run_id in enumerate(log.run_ids):
        run = client.get_run(run_id)
        assert run.info.experiment_id == log.experiment_id
        tags = run.data.tags
        assert (tags["mlflow.parentRunId"], tags["population.parent"], tags["population.member"]) == (
            log.parent_run_id, log.parent_run_id, str(k))
        assert (tags["optimizer"], tags["model"], "study" in tags) == ("adam", "mlp", False)  # None: no tag
        assert run.data.params == flatten(members[k]["params"])
        names.append(run.info.run_name)
    assert names == [members[0]["run_name"], members[1]["run_name"], members[2]["run_name"],
                     members[0]["run_name"] + " (2)"]
    assert senders == 1 and created < 10  # one thread for every run


def test_each_members_curves_land_in_its_run_at_their_steps(population, mlflow_uri):
    log, *_ = population
    client = MlflowClient(mlflow_uri)
    for k in (0, 1, 3):
        assert history(client, log.run_ids[k], "train_loss") == [(s, pytest.approx(k + s / 100))
                                                                 for s in range(1, STEPS + 1)]
        assert history(client, log.run_ids[k], "val_loss") == [(s, pytest.approx(k + s / 10)) for s in (10, 20, 30)]
    assert history(client, log.parent_run_id, "epoch") == [(10, 0), (20, 1), (30, 2)]
    assert client.get_run(log.parent_run_id).data.metrics.keys() == {"epoch"}


def test_a_member_ended_early_fails_with_its_reason_while_the_others_finish(population, mlflow_uri):
    log, *_ = population
    client = MlflowClient(mlflow_uri)
    failed = client.get_run(log.run_ids[2])
    assert (failed.info.status, failed.data.tags["failure_reason"]) == ("FAILED", f"diverged at step {DIVERGES}")
    # its curve ends where it was closed: rows logged for it afterwards were dropped
    assert [s for s, _ in history(client, log.run_ids[2], "train_loss")] == list(range(1, DIVERGES + 1))
    assert [s for s, _ in history(client, log.run_ids[2], "val_loss")] == [10]
    assert {client.get_run(log.run_ids[k]).info.status for k in (0, 1, 3)} == {"FINISHED"}
    assert client.get_run(log.parent_run_id).info.status == "FINISHED"
    assert "failure_reason" not in client.get_run(log.run_ids[0]).data.tags


def test_artifacts_land_on_their_run(population, mlflow_uri):
    log, *_ = population
    client = MlflowClient(mlflow_uri)
    assert [a.path for a in client.list_artifacts(log.run_ids[2])] == ["m2.txt"]
    assert [a.path for a in client.list_artifacts(log.parent_run_id)] == ["config.yaml"]
    assert client.list_artifacts(log.run_ids[0]) == []


def test_a_member_and_a_standalone_run_of_one_config_have_the_same_params_and_tags(mlflow_uri):
    """Side by side: the standalone run as train.py makes it, a population member given the same config."""
    cfg = compose(["optimizer=amsbound", "optimizer.lr=0.003", "seed=1", "+tags.study=side",
                   "logger.experiment=side-by-side"])
    standalone = make_logger(cfg, None)
    standalone.log_hyperparams(_resolved(cfg))
    standalone.close()
    pop = PopulationLogger(mlflow_uri, "side-by-side", "population", {}, [
        {"run_name": run_name(cfg), "tags": standalone.tags, "params": _resolved(cfg)}])
    pop.close()
    client = MlflowClient(mlflow_uri)
    alone, child = client.get_run(standalone.run_id).data, client.get_run(pop.run_ids[0]).data
    assert child.params == alone.params and len(alone.params) > 30
    assert alone.params["optimizer.lr"] == "0.003" and alone.params["bound.name"] == "hyperbolic"
    population_tags = {"mlflow.parentRunId", "population.parent", "population.member"}
    assert {k: v for k, v in child.tags.items() if k not in population_tags | {"mlflow.runName"}} == {
        k: v for k, v in alone.tags.items() if k != "mlflow.runName"}
    assert client.get_run(pop.run_ids[0]).info.run_name == f"{run_name(cfg)} (2)"  # same experiment: kept apart


def test_mistakes_are_refused_where_they_enter(mlflow_uri, tmp_path):
    with pytest.raises(ConfigError, match=r"members\[1\] must be a dict with a run_name.*'seeds'"):
        PopulationLogger(mlflow_uri, "mistakes", "p", {}, [member(0), {"run_name": "x", "seeds": [1]}])
    log = PopulationLogger(mlflow_uri, "mistakes", "p", {}, [member(0), member(1)])
    with pytest.raises(ConfigError, match=r"member must be in 0\.\.1, got -1"):
        log.log_member_metrics({-1: {"train_loss": 1.0}}, 1)
    with pytest.raises(ConfigError, match=r"artifacts must be existing files, got \['.*nowhere.png'\]"):
        log.close_member(0, artifacts=[tmp_path / "nowhere.png"])
    log.close_member(0)
    with pytest.raises(ConfigError, match=r"member 0 is not an open member"):
        log.close_member(0)
    log.close()


@pytest.fixture
def server(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _services import mlflow_server

    backend = f"sqlite:///{tmp_path / 'server.db'}"
    proc, url = mlflow_server(backend, tmp_path / "artifacts")
    yield proc, url, backend
    proc.terminate()
    proc.wait()


def test_a_server_away_past_outage_wait_keeps_every_metric_in_the_spill_files(server, tmp_path):
    proc, url, backend = server
    log = PopulationLogger(url, "away", "population", {}, [member(k) for k in range(3)], outage_wait=1)
    proc.terminate()
    proc.wait()
    start = time.perf_counter()
    for step in range(1, 11):
        log.log_member_metrics({k: {"train_loss": k + step / 100} for k in range(3)}, step)
        if step == 5:
            log.close_member(1, "FAILED", "diverged at step 5", spill=tmp_path / "member1.jsonl")
    log.finalize("success")  # hands everything to the sender, which retries in the background
    assert time.perf_counter() - start < 1
    with pytest.raises(TrackingUnavailable, match=r"did not answer for 1 s.*25 undelivered metric values are kept in "
                                                  r".*member1.jsonl, .*population.jsonl.* and 3 member runs stay"):
        log.close(spill=tmp_path / "population.jsonl")
    mine = [json.loads(line) for line in (tmp_path / "member1.jsonl").read_text().splitlines()]
    assert [(m["run_id"], m["key"], m["step"]) for m in mine] == [(log.run_ids[1], "train_loss", s)
                                                                  for s in range(1, 6)]
    rest = [json.loads(line) for line in (tmp_path / "population.jsonl").read_text().splitlines()]
    assert sorted((m["run_id"], m["step"], m["value"]) for m in rest) == sorted(
        (log.run_ids[k], s, k + s / 100) for k in (0, 2) for s in range(1, 11))
    client = MlflowClient(backend)  # the server's store, read directly
    assert {client.get_run(r).info.status for r in [log.parent_run_id, *log.run_ids]} == {"RUNNING"}
