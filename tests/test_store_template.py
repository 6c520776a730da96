"""A new SQLite tracking store is a copy of an empty one (``optstudy._store_template``), not MLflow's migrations run
again: real MLflow opens it as its own, with its Default experiment where MLflow puts it, and runs log to it."""

from __future__ import annotations

import os
import sqlite3
import threading

import mlflow.store.db.utils as db_utils
import pytest
from mlflow import MlflowClient

from optstudy import _store_template
from optstudy.tracking import MLflowLogger


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTSTUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mlflow"


def no_migrations(monkeypatch):
    def refuse(engine):
        raise AssertionError("MLflow ran its migrations on a store made from the template")
    monkeypatch.setattr(db_utils, "_initialize_tables", refuse)


def test_a_new_store_is_the_template_and_mlflow_takes_it_as_its_own(tmp_path, cache, monkeypatch):
    assert _store_template.seed(f"sqlite:///{tmp_path / 'first.db'}")  # makes the template, then copies it
    assert [p.name for p in cache.iterdir()] == [f"empty-mlflow-{__import__('mlflow').__version__}.db"]
    no_migrations(monkeypatch)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # a folder that does not exist yet
    logger = MLflowLogger(uri, "exp", run_name="r")
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.log_hyperparams({"optimizer": {"lr": 0.1}})
    logger.close("FINISHED")
    client = MlflowClient(uri)
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location.endswith(f"{tmp_path.name}/mlruns/0")
    run = client.get_run(logger.run_id)
    assert run.data.metrics == {"loss": 0.5} and run.data.params == {"optimizer.lr": "0.1"}
    assert run.info.status == "FINISHED"
    mode = os.stat(tmp_path / "runs" / "mlflow.db").st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def test_an_existing_store_and_other_stores_are_left_alone(tmp_path, cache):
    existing = tmp_path / "old.db"
    existing.write_bytes(b"")
    assert not _store_template.seed(f"sqlite:///{existing}") and existing.read_bytes() == b""
    for uri in ("sqlite:///:memory:", f"sqlite:///{tmp_path / 'x.db'}?mode=ro", "http://127.0.0.1:5000",
                "postgresql+psycopg://u@h/db"):
        assert not _store_template.seed(uri)
    assert not cache.exists()


def test_processes_starting_at_once_on_one_new_store_both_find_it_whole(tmp_path, cache):
    _store_template.seed(f"sqlite:///{tmp_path / 'warm.db'}")
    target = tmp_path / "shared.db"
    results = []
    threads = [threading.Thread(target=lambda: results.append(_store_template.seed(f"sqlite:///{target}")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]  # one made it; the others found it there
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared")] == []  # no copies left behind
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT experiment_id, name FROM experiments").fetchall() == [(0, "Default")]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
