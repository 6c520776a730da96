"""Member runs written in one transaction (``optstudy.population._bulk``) read back through ``MlflowClient`` exactly as
runs made by the public API one request at a time: name, tags, params, status, times, artifact location, ends."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Param

from optstudy.population import _bulk
from optstudy.population.tracking import _unique_names


def public(client, experiment_id, name, tags, params) -> str:
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, params=params)
    return run_id


def view(run) -> dict:
    info = run.info
    return {"name": info.run_name, "status": info.status, "experiment": info.experiment_id, "user": info.user_id,
            "lifecycle": info.lifecycle_stage, "end": info.end_time is not None, "tags": run.data.tags,
            "params": run.data.params, "artifacts": info.artifact_uri.replace(info.run_id, "<id>")}


def test_bulk_runs_read_back_as_runs_made_one_request_at_a_time(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("bulk")
    backend = _bulk.store(client)
    assert backend is not None
    runs = [(f"adam lr={lr:g} seed=0", {"optimizer": "adam", "population.member": str(k)},
             [Param("optimizer.lr", str(lr)), Param("seed", "0"), Param("optimizer.betas", "[0.9, 0.999]")])
            for k, lr in enumerate([1e-3, 1e-2, 0.1])]
    bulk = _bulk.create_runs(backend, experiment, runs, 1_700_000_000_000)
    one = [public(client, experiment, *run) for run in runs]
    for a, b in zip(bulk, one):
        assert view(client.get_run(a)) == view(client.get_run(b))
    # ended: a failure with its reason, a pruned member KILLED, a finished one; as set_tag + set_terminated
    ends = [("FAILED", "Diverged: the loss is nan"), ("KILLED", None), ("FINISHED", None)]
    _bulk.end_runs(backend, [(run_id, status, reason) for run_id, (status, reason) in zip(bulk, ends)],
                   1_700_000_001_000)
    for run_id, (status, reason) in zip(one, ends):
        if reason:
            client.set_tag(run_id, "failure_reason", reason)
        client.set_terminated(run_id, status=status)
    for a, b in zip(bulk, one):
        assert view(client.get_run(a)) == view(client.get_run(b))
    assert client.get_run(bulk[0]).info.end_time == 1_700_000_001_000


def test_unique_names_in_one_query_equal_the_per_name_searches(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("names")
    for name in ["adam lr=0.1 seed=0", "adam lr=0.1 seed=0 (2)", "sgd lr=1 seed=0", "odd_%name"]:
        client.create_run(experiment, run_name=name)
    deleted = client.create_run(experiment, run_name="adam lr=0.01 seed=0").info.run_id
    client.delete_run(deleted)  # not taken: MLflowLogger's search sees active runs only
    asked = ["adam lr=0.1 seed=0", "adam lr=0.1 seed=0", "adam lr=0.01 seed=0", "odd_%name", "sgd lr=1 seed=0"]
    one_query = _unique_names(client, experiment, asked, _bulk.store(client))
    per_name = _unique_names(client, experiment, asked)
    assert one_query == per_name == ["adam lr=0.1 seed=0 (3)", "adam lr=0.1 seed=0 (4)", "adam lr=0.01 seed=0",
                                     "odd_%name (2)", "sgd lr=1 seed=0 (2)"]


def test_a_server_store_goes_through_the_public_api():
    assert _bulk.store(MlflowClient("http://127.0.0.1:1")) is None


def test_metrics_in_one_transaction_read_back_as_log_batch_writes_them(tmp_path):
    from mlflow.entities import Metric

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("metrics")
    backend = _bulk.store(client)
    bulk = _bulk.create_runs(backend, experiment, [("a", {}, []), ("b", {}, [])], 0)
    one = [public(client, experiment, name, {}, []) for name in ("a", "b")]
    # out of order, NaN and inf, a later step with a smaller value; a second batch moves one latest value on
    batches = [[("loss", 2.0, 10, 2), ("loss", 3.0, 10, 1), ("acc", float("nan"), 11, 1), ("acc", float("inf"), 9, 2)],
               [("loss", 1.0, 20, 3), ("loss", 5.0, 20, 0)]]
    for batch in batches:
        _bulk.log_metrics(backend, [(run_id, *row) for run_id in bulk for row in batch])
        for run_id in one:
            client.log_batch(run_id, metrics=[Metric(key, value, ts, step) for key, value, ts, step in batch])
    for a, b in zip(bulk, one):
        ra, rb = client.get_run(a), client.get_run(b)
        assert str(ra.data.metrics) == str(rb.data.metrics)  # the latest values (str: NaN == NaN)
        for key in ("loss", "acc"):
            history = lambda run_id: sorted(str((m.step, m.timestamp, m.value)) for m in  # noqa: E731
                                            client.get_metric_history(run_id, key))
            assert history(a) == history(b)


def test_a_members_config_is_written_as_omegaconf_writes_it():
    from omegaconf import OmegaConf

    from optstudy.config import compose
    from optstudy.population.members import member_dicts
    from optstudy.population.run import to_yaml

    config = member_dicts(compose(["optimizer=amsbound", "population.lr=[1e-3,1e-2]"]))[0][1]
    config["tags"] = {"float_like": "1e-3", "bool_like": "yes", "colon": "a: b", "unicode": "ünï", "none": None}
    assert to_yaml(config) == OmegaConf.to_yaml(config)
