"""MLflow tracking: one run per training, written in batches off the training thread.

``MLflowLogger`` is a Lightning logger over ``MlflowClient``. Metrics are buffered and sent in batches of up to 1000
by a background thread (``Sender``), so a step that logs costs a list append, not a round trip: against a tracking
server one synchronous ``log_metric`` costs ~75 ms here. Only rank 0 creates a run and
logs (Lightning calls loggers on rank 0 only).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the working directory (MLflow >= 3.13
refuses a ``./mlruns`` file store); artifacts of that local store go to ``mlartifacts/`` beside it.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time
import warnings
from pathlib import Path

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

DEFAULT_DB = "mlflow.db"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, an assistant), with no parameter
# or metric columns in the runs table; this kind opens it on the runs table, as a model-training experiment
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so the run
    can be found again from any directory)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def ui_command(uri: str) -> str:
    """How a person opens this store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """``{"optimizer": {"lr": 0.001}}`` -> ``{"optimizer.lr": "0.001"}``; lists stay whole (``[0.9, 0.999]``)."""
    if not isinstance(tree, dict):
        return {prefix: str(tree)}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def _quiet_mlflow():
    # MLflow 3's usage telemetry retries its upload in a background thread; offline (clusters, this machine) that
    # thread kept a core busy and made training steps 5x slower through OpenMP contention. Off unless a user turns
    # it on explicitly.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # mlflow sets its loggers' level from this when imported (INFO otherwise: "Updating database tables" on a first
    # run), after any setLevel of ours
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow logs its database migrations and async-queue start at INFO; a training run should print its own lines
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")


class MLflowLogger(Logger):
    """A Lightning logger writing to one MLflow run, created on first use on rank 0 (or reopened: ``run_id``)."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, tags: dict | None = None,
                 run_id: str | None = None, flush_every: int = 500, flush_seconds: float = 5.0):
        super().__init__()
        self.uri, self.experiment_name, self.run_name = uri, experiment, run_name
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        self._run_id, self._client = run_id, None
        self._buffer: list = []
        self._sender: Sender | None = None
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._last_flush = time.monotonic()

    # --- Lightning's Logger interface -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.experiment_name

    @property
    def version(self) -> str | None:
        return self._run_id

    @property
    @rank_zero_only
    def experiment(self):
        """The ``MlflowClient``; creates the run on first access."""
        if self._client is None:
            self._start()
        return self._client

    @property
    def run_id(self) -> str | None:
        if self._run_id is None and rank_zero_only.rank == 0:
            self._start()
        return self._run_id

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param

        flat = flatten(params if isinstance(params, dict) else vars(params))
        items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.experiment.log_batch(self.run_id, params=items[i:i + 100])

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        # Lightning calls this at the end of fit ("success") and on an exception ("failed"); the run is closed
        # by ``close``, which knows the reason of a failure
        self.flush()

    # --- ours ---------------------------------------------------------------------------------------------------
    @rank_zero_only
    def flush(self, wait: bool = False) -> None:
        """Hands the buffered metrics to the sender thread; ``wait``: until they are written."""
        if self._buffer:
            if self._sender is None:
                self._sender = Sender(self.experiment, self.run_id)
            batch, self._buffer = self._buffer, []
            for i in range(0, len(batch), 1000):  # MLflow's limit per batch
                self._sender.send(batch[i:i + 1000])
        self._last_flush = time.monotonic()
        if wait and self._sender is not None:
            self._sender.stop()
            self._sender = None

    @rank_zero_only
    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.experiment.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @rank_zero_only
    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.experiment.log_artifact(self.run_id, str(path), artifact_path)

    @rank_zero_only
    def close(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Writes what is buffered and ends the run; a failed run keeps its curves and gets the reason as a tag."""
        if self._client is None:
            return
        self.flush(wait=True)
        if reason:
            self.set_tags({"failure_reason": reason[:5000]})
        self._client.set_terminated(self._run_id, status=status)

    def _start(self) -> None:
        _quiet_mlflow()
        from mlflow import MlflowClient

        self._client = MlflowClient(self.uri)
        if self._run_id is not None:  # resuming: the run continues
            self._client.update_run(self._run_id, status="RUNNING")
            return
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            exp_id = self._client.create_experiment(self.experiment_name, artifact_location=self._artifacts(),
                                                    tags=dict([EXPERIMENT_KIND]))
        else:
            exp_id = experiment.experiment_id
            if EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older optstudy, or by hand
                self._client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        self.run_name = self._unique_name(exp_id)
        run = self._client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self._run_id = run.info.run_id

    def _unique_name(self, exp_id: str) -> str | None:
        """The run name, with `` (2)``, `` (3)``, ... when the experiment has it already: two runs of one command
        were indistinguishable in the UI's legends."""
        if not self.run_name:
            return self.run_name
        quoted = self.run_name.replace("'", "\\'")
        taken = {r.info.run_name for r in self._client.search_runs(
            [exp_id], filter_string=f"attributes.run_name LIKE '{quoted}%'", max_results=50000)}
        name, k = self.run_name, 1
        while name in taken:
            k += 1
            name = f"{self.run_name} ({k})"
        return name

    def _artifacts(self) -> str | None:
        # MLflow's default for a SQLite store is ./mlruns relative to wherever the process runs; keep the
        # artifacts beside the database instead, wherever train.py is started from
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri[len("sqlite:///"):])
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.experiment_name)
        return (db.parent / "mlartifacts" / safe).resolve().as_uri()


class Sender:
    """One daemon thread that writes metric batches with synchronous ``log_batch`` calls, in order.

    MLflow's own asynchronous queue (``synchronous=False``) does the same with four threads, but its loop polls
    with a one-second timeout, so ending a run waited 0.5 s on average: a third of a short study trial.
    """

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="optstudy-mlflow-sender", daemon=True)
        self.thread.start()

    def send(self, metrics: list) -> None:
        self.queue.put(metrics)

    def stop(self) -> None:
        """Writes what is queued, ends the thread, and raises the first error it met."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while (batch := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception as exc:  # kept for stop(): a failure must not pass silently
                    self.error = exc
