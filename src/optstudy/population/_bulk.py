"""A population's member runs created and ended in one database transaction each, where MLflow's store is a database.

MLflow has no batch run creation: one member costs three requests (the unique-name query, ``create_run``, the params'
``log_batch``), each its own transaction; on SQLite each commit waits for the disk, 35 + 70 ms a member on the 2-core
VM while other work ran (``benchmarks/population.py`` profiles; 144 members: ~15 s, more than their training). Here the
K runs, their tags and params are written as MLflow's ``SqlAlchemyStore`` writes one run (the same rows: a run made
here reads back through ``MlflowClient.get_run`` as one made by ``create_run``; ``tests/population/test_bulk.py``)
but in one session, and the names are checked with one query. Any other store (an ``mlflow server``: a
``RestStore``) goes through the public client, one member at a time. The rows are MLflow's own model classes,
which MLflow's migrations keep in step with the schema; an MLflow whose classes differ makes ``store`` return None.
"""

from __future__ import annotations

import uuid

MEMBER_TAGS = ("mlflow.parentRunId", "population.parent", "population.member")


def store(client):
    """The client's ``SqlAlchemyStore`` (SQLite, PostgreSQL, MySQL), or None: use the public API."""
    try:
        from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag  # noqa: F401
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:
        return None
    backend = getattr(getattr(client, "_tracking_client", None), "store", None)
    return backend if type(backend) is SqlAlchemyStore else None


def taken_names(backend, experiment_id: str, bases: list[str]) -> set[str]:
    """The names of the experiment's active runs that start with one of ``bases`` (MLflowLogger's ``LIKE 'base%'``
    query, for all the bases at once)."""
    from mlflow.entities import LifecycleStage
    from mlflow.store.tracking.dbmodels.models import SqlRun
    from sqlalchemy import or_

    taken: set[str] = set()
    with backend.ManagedSessionMaker() as session:
        for i in range(0, len(bases), 200):  # SQLite's expression depth
            likes = [SqlRun.name.like(_escape(b) + "%", escape="\\") for b in bases[i:i + 200]]
            rows = session.query(SqlRun.name).filter(SqlRun.experiment_id == int(experiment_id),
                                                     SqlRun.lifecycle_stage == LifecycleStage.ACTIVE, or_(*likes))
            taken |= {name for (name,) in rows}
    return taken


def create_runs(backend, experiment_id: str, runs: list[tuple[str, dict, list]], start_ms: int) -> list[str]:
    """``runs[i] = (name, tags, params)``: the rows ``SqlAlchemyStore.create_run`` then ``log_batch(params=)`` write,
    inserted in one transaction with one statement per table (ORM objects cost ~0.1 ms each: 90 params a run).
    Returns the run ids."""
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
    from mlflow.utils.uri import append_to_uri_path

    experiment = backend.get_experiment(experiment_id)
    backend._check_experiment_is_active(experiment)
    rows, tags, params = [], [], []
    for name, run_tags, run_params in runs:
        run_id = uuid.uuid4().hex
        rows.append({"run_uuid": run_id, "name": name, "experiment_id": int(experiment_id),
                     "artifact_uri": append_to_uri_path(experiment.artifact_location, run_id, "artifacts"),
                     "source_type": SourceType.to_string(SourceType.UNKNOWN), "source_name": "",
                     "entry_point_name": "", "user_id": run_tags.get(MLFLOW_USER, "unknown"),
                     "status": RunStatus.to_string(RunStatus.RUNNING), "start_time": start_ms, "end_time": None,
                     "deleted_time": None, "source_version": "", "lifecycle_stage": LifecycleStage.ACTIVE})
        tags += [{"run_uuid": run_id, "key": k, "value": v} for k, v in {**run_tags, MLFLOW_RUN_NAME: name}.items()]
        params += [{"run_uuid": run_id, "key": p.key, "value": p.value} for p in run_params]
    with backend.ManagedSessionMaker(read_only=False) as session:
        session.execute(SqlRun.__table__.insert(), rows)
        for table, values in ((SqlTag.__table__, tags), (SqlParam.__table__, params)):
            if values:
                session.execute(table.insert(), values)
    return [row["run_uuid"] for row in rows]


def end_runs(backend, ends: list[tuple[str, str, str | None]], end_ms: int) -> None:
    """``ends[i] = (run_id, status, reason)``: each run's ``failure_reason`` tag (where a reason is given) and its
    end, as ``set_tag`` and ``set_terminated`` write them, in one transaction."""
    from mlflow.entities import RunStatus
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag

    with backend.ManagedSessionMaker(read_only=False) as session:
        runs = {r.run_uuid: r for r in session.query(SqlRun).filter(SqlRun.run_uuid.in_([e[0] for e in ends]))}
        for run_id, status, reason in ends:
            run = runs[run_id]
            backend._check_run_is_active(run)
            if reason:
                session.merge(SqlTag(run_uuid=run_id, key="failure_reason", value=reason[:5000]))
            run.status = RunStatus.to_string(RunStatus.from_string(status))
            run.end_time = end_ms


def log_metrics(backend, rows: list[tuple]) -> None:
    """``rows``: (run id, key, value, timestamp ms, step) of many runs, as ``log_batch(metrics=)`` writes them per
    run (NaN stored as 0 with ``is_nan``, ±inf as ±max float; ``latest_metrics`` keeps each key's largest (step,
    timestamp, value)), in one transaction. The rows must be new (a repeated one raises ``IntegrityError``): the
    sender's are, each (run, key, step) logged once."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    values, latest = [], {}
    for run_id, key, value, timestamp, step in rows:
        is_nan, value = backend.sanitize_metric_value(value)
        values.append({"run_uuid": run_id, "key": key, "value": value, "timestamp": timestamp, "step": step,
                       "is_nan": is_nan})
        new = (step, timestamp, value, is_nan)
        if (run_id, key) not in latest or new[:3] > latest[run_id, key][:3]:
            latest[run_id, key] = new
    with backend.ManagedSessionMaker(read_only=False) as session:
        runs = sorted({run_id for run_id, _ in latest})
        have = {(m.run_uuid, m.key): m for i in range(0, len(runs), 500) for m in session.query(SqlLatestMetric)
                .filter(SqlLatestMetric.run_uuid.in_(runs[i:i + 500])).order_by(SqlLatestMetric.run_uuid,
                                                                                SqlLatestMetric.key)}
        session.execute(SqlMetric.__table__.insert(), values)
        fresh = []
        for (run_id, key), (step, timestamp, value, is_nan) in latest.items():
            old = have.get((run_id, key))
            if old is None:
                fresh.append({"run_uuid": run_id, "key": key, "value": value, "timestamp": timestamp, "step": step,
                              "is_nan": is_nan})
            elif (step, timestamp, value) > (old.step, old.timestamp, old.value):
                old.value, old.step, old.timestamp, old.is_nan = value, step, timestamp, is_nan
        if fresh:
            session.execute(SqlLatestMetric.__table__.insert(), fresh)


def artifact_repos(backend, tracking_uri: str, run_ids: list[str]) -> dict:
    """Each run's artifact repository from one query (``MlflowClient.log_artifact`` reads the whole run, params
    and metrics included, to find it)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.tracking.dbmodels.models import SqlRun

    with backend.ManagedSessionMaker() as session:
        uris = dict(session.query(SqlRun.run_uuid, SqlRun.artifact_uri).filter(SqlRun.run_uuid.in_(run_ids)))
    return {run_id: get_artifact_repository(uri, tracking_uri=tracking_uri) for run_id, uri in uris.items()}


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
