"""A new SQLite tracking store starts as a copy of an empty one.

MLflow makes a new SQLite store by running its schema migrations one by one: 1.8 s of every new study's and every
first run's start-up on this machine (a third of a population study worker's start-up besides its imports). The first
time, ``seed`` has MLflow make an empty store once per MLflow version, without experiments, under
``$OPTSTUDY_CACHE/mlflow`` (else ``~/.cache/optstudy/mlflow``); from then on a new store is a copy of it (~20 ms), in
which MLflow creates its Default experiment (its artifact location is relative to where the run starts) before the
copy takes its name. Copies appear under their name whole, Default experiment included, or not at all (``os.link``
of a finished file): two processes starting at once on the same new file both find it complete, and neither creates
the Default experiment beside the other. Anything that goes wrong leaves the store to MLflow.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

from optstudy import _cache

log = logging.getLogger(__name__)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI; None for other stores, in-memory databases and URIs with options."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    path = uri[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


def seed(uri: str) -> bool:
    """Creates the store at ``uri`` from the template if it is a SQLite file that does not exist yet. Returns whether
    this call made it."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return False
    try:
        template = _template()
        path.parent.mkdir(parents=True, exist_ok=True)
        return _place(template, path)
    except Exception as exc:  # noqa: BLE001 (MLflow makes the store itself, as without us)
        log.debug("no SQLite template for %s: %s", uri, exc)
        return False


def _template() -> Path:
    import mlflow

    path = _cache.cache_dir("mlflow") / f"empty-mlflow-{mlflow.__version__}.db"
    if not path.exists():
        _make(path)
    return path


def _make(path: Path) -> None:
    """MLflow's own empty store, its Default experiment removed (MLflow makes it again where the copy is opened)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        db = Path(tmp) / "store.db"
        store = SqlAlchemyStore(f"sqlite:///{db}", (Path(tmp) / "artifacts").as_uri())
        store.engine.dispose()
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM experiment_tags")
            conn.execute("DELETE FROM experiments")
        conn.close()
        os.replace(db, path)  # whole: another process may be reading the template


def _place(template: Path, path: Path) -> bool:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(template, "rb") as src, open(tmp, "xb") as dst:  # the umask's mode, as MLflow's own file
            shutil.copyfileobj(src, dst)
        _open(tmp)
        try:
            os.link(tmp, path)  # fails if the file appeared meanwhile: then that one stays
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _open(db: Path) -> None:
    """MLflow opens the copy as a client of this process would (its Default experiment made there), then lets go."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    _get_sqlalchemy_store(f"sqlite:///{db}", None).engine.dispose()
