"""Every test tracks into one SQLite MLflow store of the session and runs in its own directory (Hydra and
checkpoint outputs land there, not in the repository)."""

import pytest


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    # one database for the session: creating its tables takes seconds, a run in it milliseconds
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, mlflow_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
