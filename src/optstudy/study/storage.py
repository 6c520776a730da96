"""Optuna storages from a URL: a journal file locally, a database (PostgreSQL on clusters) with heartbeats.

- ``None``: ``$OPTSTUDY_STORAGE``, else the journal file ``optuna.journal`` in the working directory;
- a path, or ``journal:///abs/path`` / ``journal://rel/path``: Optuna's journal file storage, safe for several
  processes on one machine (SQLite is not: its writers lock each other out);
- ``postgresql+psycopg://user:pw@host:port/db`` (or any SQLAlchemy URL): ``RDBStorage`` with a heartbeat every
  ``heartbeat`` seconds, so that a trial whose worker died is failed after two missed beats and retried.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from pathlib import Path

import optuna

from optstudy.errors import ConfigError

DEFAULT = "optuna.journal"


def resolve(url: str | None) -> str:
    return url or os.environ.get("OPTSTUDY_STORAGE") or DEFAULT


def open_storage(url: str | None, heartbeat: int = 30):
    """``(storage, url)`` for ``url`` (see the module docstring)."""
    url = resolve(url)
    if "://" in url and not url.startswith("journal://"):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]  # SQLAlchemy would look for psycopg2
        return _database(url, heartbeat), url
    path = Path(url[len("journal://"):] if url.startswith("journal://") else url)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend), str(path)


def _database(url: str, heartbeat: int, attempts: int = 5) -> optuna.storages.RDBStorage:
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                    engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:
            # workers that start together on an empty database race to create Optuna's tables; the losers
            # fail on a duplicate table and succeed once the winner is done
            if attempt + 1 < attempts and "already exists" in str(exc).lower() + repr(exc).lower():
                time.sleep(0.5 + random.random())
                continue
            # a wrong URL, a server that is down: say which, without a traceback
            raise ConfigError(f"--storage {url}: cannot open it ({type(exc).__name__}: {exc})") from None
    raise AssertionError("unreachable")
