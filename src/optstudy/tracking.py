"""MLflow tracking: one run per training, written in batches off the training thread.

``MLflowLogger`` is a Lightning logger over ``MlflowClient``. Metrics are buffered and sent in batches of up to 1000
by a background thread (``Sender``), so a step that logs costs a list append, not a round trip: against a tracking
server one synchronous ``log_metric`` costs ~75 ms here. Only rank 0 creates a run and
logs (Lightning calls loggers on rank 0 only).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the working directory (MLflow >= 3.13
refuses a ``./mlruns`` file store); artifacts of that local store go to ``mlartifacts/`` beside it.
"""

from __future__ import annotations

import json
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

from optstudy import _store_template
from optstudy.errors import OptstudyError

DEFAULT_DB = "mlflow.db"
# what kind of experiment this is, for MLflow's own inference of it; MLflow 3.17's UI does not open the runs table for
# it (its global GenAI/Model training switch decides): the links ``ui_command`` prints ask for that
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so the run
    can be found again from any directory)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """How a person opens this store (at ``experiment_id``'s runs table) in the MLflow UI.

    The link asks for ``workflowType=machine_learning``: MLflow 3.17's UI otherwise opens every experiment in its
    GenAI mode (an overview of traces, no runs table), whatever the experiment's tags say; once opened this way the
    UI remembers the mode (the "Model training" switch at its top left)."""
    page = f"/#/experiments/{experiment_id}" if experiment_id else "/#/experiments"
    page += "?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {uri}, then its page {page}"


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
    # one quick retry per request: the sender retries a batch itself for as long as an outage may last, where
    # MLflow's default (7 retries, backoff factor 2, 120 s timeout) stalled a call for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # mlflow sets its loggers' level from this when imported (INFO otherwise: "Updating database tables" on a first
    # run), after any setLevel of ours
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow logs its database migrations and async-queue start at INFO; a training run should print its own lines
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")


class TrackingUnavailable(OptstudyError):
    """The tracking server stayed unreachable until ``outage_wait`` seconds after the end of a run."""

    exit_code = 4


# MLflow's error codes for a request that is wrong, not a server that is away: retrying cannot help
PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
             "PERMISSION_DENIED", "UNAUTHENTICATED"}


def transient(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) not in PERMANENT


class MLflowLogger(Logger):
    """A Lightning logger writing to one MLflow run, created on first use on rank 0 (or reopened: ``run_id``)."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, tags: dict | None = None,
                 run_id: str | None = None, flush_every: int = 500, flush_seconds: float = 5.0,
                 outage_wait: float = 60.0):
        super().__init__()
        # the server may go away during a run: metrics wait in the sender and go when it is back; the end of the run
        # waits this long for it, then keeps what is undelivered in a file (close's ``spill``)
        self.outage_wait = outage_wait
        self.uri, self.experiment_name, self.run_name = uri, experiment, run_name
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        self._run_id, self._client = run_id, None
        self.experiment_id: str | None = None  # known once the run is created
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
            sender, self._sender = self._sender, None
            sender.stop(self.outage_wait)

    @rank_zero_only
    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.experiment.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @rank_zero_only
    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.experiment.log_artifact(self.run_id, str(path), artifact_path)

    @rank_zero_only
    def close(self, status: str = "FINISHED", reason: str | None = None, artifacts=(), spill: Path | None = None):
        """Writes what is buffered, uploads ``artifacts`` and ends the run; a failed run keeps its curves and gets
        the reason as a tag. A server still away ``outage_wait`` s after the first failed try: the undelivered
        metrics go to ``spill`` (JSON lines) and ``TrackingUnavailable`` says where; the run stays RUNNING there."""
        if self._client is None:
            return
        try:
            self.flush(wait=True)
        except TrackingUnavailable as exc:
            if spill is not None:
                with open(spill, "w") as f:
                    for m in exc.args[1]:
                        f.write(json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp})
                                + "\n")
            where = f"kept in {spill}" if spill is not None else "lost"
            raise TrackingUnavailable(f"{exc.args[0]}; its {len(exc.args[1])} undelivered metric values are "
                                      f"{where}, and MLflow run {self._run_id} stays RUNNING") from None
        end = time.monotonic() + self.outage_wait
        deadline = lambda: end  # noqa: E731  (one deadline for every call below)
        for path in artifacts:
            _retrying(deadline, self.experiment.log_artifact, self.run_id, str(path))
        if reason:
            _retrying(deadline, self.set_tags, {"failure_reason": reason[:5000]})
        _retrying(deadline, self._client.set_terminated, self._run_id, status=status)

    def _start(self) -> None:
        _quiet_mlflow()
        from mlflow import MlflowClient

        _store_template.seed(self.uri)  # a new SQLite store as a copy of an empty one: MLflow's migrations take 1.8 s
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
        self.experiment_id = exp_id
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
        self.deadline: float | None = None  # set by stop(): when to give up on a server that is away
        self.undelivered: list = []
        self.outage: str | None = None  # the last transient failure, once given up
        self.thread = threading.Thread(target=self._loop, name="optstudy-mlflow-sender", daemon=True)
        self.thread.start()

    def send(self, metrics: list) -> None:
        self.queue.put(metrics)

    def stop(self, wait: float = 60.0) -> None:
        """Writes what is queued, waiting up to ``wait`` s for a server that is away, and ends the thread. Raises
        the first permanent error it met, or ``TrackingUnavailable(message, undelivered metrics)``."""
        self.deadline = time.monotonic() + wait
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.undelivered:
            raise TrackingUnavailable(f"the tracking server did not answer for {wait:g} s after the run ended "
                                      f"({self.outage})", self.undelivered)

    def _loop(self) -> None:
        while (batch := self.queue.get()) is not None:
            if self.error is None and not self.undelivered:
                self._deliver(batch)
            else:  # given up: keep the rest in order for the spill file
                self.undelivered += batch

    def _deliver(self, batch: list) -> None:
        # no deadline while the run goes on (training continues; the batches after this one wait in the queue),
        # stop()'s once it ends
        try:
            _retrying(lambda: self.deadline, self.client.log_batch, self.run_id, metrics=batch)
        except TrackingUnavailable as exc:
            self.outage = exc.reason
            self.undelivered += batch
        except Exception as exc:  # kept for stop(): a failure must not pass silently
            self.error = exc


def _retrying(deadline, call, *args, **kwargs):
    """``call`` retried while the server is away, with backoff, until ``deadline()`` (a monotonic time, or None: no
    deadline yet) has passed; then ``TrackingUnavailable``, whose ``reason`` is the last failure."""
    delay = 0.25
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not transient(exc):
                raise
            end = deadline()
            if end is not None and time.monotonic() > end:
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
                error = TrackingUnavailable(f"the tracking server did not answer ({reason})")
                error.reason = reason
                raise error from None
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
