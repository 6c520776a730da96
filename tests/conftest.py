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


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for the test, restored after: tests that compare with references or standalone
    runs at float64 build their tensors and models in it."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL (postgresql+psycopg://...) of the `optuna` database of a PostgreSQL server:
    $OPTSTUDY_TEST_POSTGRES_URL (CI sets it), else a throwaway server for the session (scripts/postgres.sh). Skips
    where PostgreSQL is not installed; fails instead when $CI is set. Shared by the session: see postgres_db_url."""
    from . import postgres

    with postgres.server() as url:
        yield url


@pytest.fixture
def postgres_db_url(postgres_url):
    """URL of a fresh, empty database of its own on postgres_url's server, dropped after the test."""
    from . import postgres

    with postgres.fresh_database(postgres_url) as url:
        yield url
