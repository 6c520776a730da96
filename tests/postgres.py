"""PostgreSQL for the tests: a server (CI's, or a throwaway one from scripts/postgres.sh) and a fresh database per
test. The fixtures `postgres_url` and `postgres_db_url` in conftest.py wrap these."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
URL_ENV = "OPTSTUDY_TEST_POSTGRES_URL"  # set by .ci/run: the `optuna` database of the server it started
NO_POSTGRES = 3  # scripts/postgres.sh's exit status when no PostgreSQL server binaries are installed


@contextmanager
def server() -> Iterator[str]:
    """Yields the SQLAlchemy URL of the `optuna` database of a server: $OPTSTUDY_TEST_POSTGRES_URL, else one started
    for the duration. Skips where PostgreSQL is not installed, except under CI ($CI set), which must not skip."""
    if url := os.environ.get(URL_ENV):
        yield url
        return
    # under /tmp, not pytest's tmp_path: as root the server runs as another user, who must reach the directory
    tmp = tempfile.mkdtemp(prefix="optstudy-pg-")
    try:
        r = subprocess.run([SCRIPT, "start", tmp], capture_output=True, text=True)
        if r.returncode:
            why = f"cannot start a PostgreSQL server ({SCRIPT.name} exit {r.returncode}): {r.stderr.strip()}"
            if r.returncode == NO_POSTGRES and not os.environ.get("CI"):
                pytest.skip(why)
            pytest.fail(why + (f" [CI is set: set {URL_ENV} or install PostgreSQL]" if os.environ.get("CI") else ""),
                        pytrace=False)
        yield r.stdout.strip()
    finally:
        subprocess.run([SCRIPT, "stop", tmp], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _admin(url: URL) -> psycopg.Connection:
    """Autocommit connection to the server's `postgres` maintenance database (CREATE/DROP DATABASE need both)."""
    return psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                           dbname="postgres", autocommit=True, **url.query)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """Creates an empty database on server_url's server (the role needs CREATEDB), yields its URL (same driver and
    credentials), drops it afterwards, closing any connection left to it."""
    url = make_url(server_url)
    name = f"test_{uuid.uuid4().hex[:16]}"
    with _admin(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin(url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
