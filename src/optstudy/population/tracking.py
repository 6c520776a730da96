"""MLflow tracking for a population: one parent run, one child run per member, one sender thread for all of them.

Each member's run carries what a standalone run of its config has (params, tags, curves, effective-LR quantiles,
artifacts: see ``optstudy.tracking``), plus the tags ``mlflow.parentRunId`` (the UI nests it under the parent),
``population.parent`` and ``population.member`` (its index k), so members and standalone runs compare side by side.

Costs, SQLite store on the 2-core development VM (``benchmarks/population_logging.py``): creating K = 64 member runs
took 1.3-1.8 s with three requests per member (MLflow has no batch run creation); on a database store they are now
created, and ended, in one transaction each (``_bulk``); ``log_member_metrics`` takes ~0.1 ms
of the training thread at K = 64. The sender pays MLflow's ~70 µs per metric value (up to ~200 µs when it competes
for the GIL and the cores) and ~4.5 ms per ``log_batch`` call, so rows are held until each run has many values to send
(5 s, or ~1000 values per run). At K = 64 a step logs ~95 values: 7-20 ms of sender CPU per step, which made a 20 ms
simulated step ~11 ms slower here (the VM's second core busy with other work at the time).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
from pathlib import Path

from pytorch_lightning.loggers import Logger

from optstudy.errors import ConfigError
from optstudy.population import _bulk
from optstudy.tracking import MLflowLogger, Sender, TrackingUnavailable, _retrying, flatten

MEMBER_KEYS = {"run_name", "tags", "params"}
FLUSH_SECONDS = 5.0  # as MLflowLogger: how stale a curve in the UI may get


class PopulationLogger(Logger):
    """A Lightning logger for K members trained in one process: Lightning's own metrics go to the parent run, each
    member's to its run (``log_member_metrics``). All runs are created here, at once."""

    def __init__(self, uri: str, experiment: str, parent_name: str, parent_tags: dict, members: list[dict],
                 outage_wait: float = 60.0):
        """``members[k]``: ``{"run_name": str, "tags": dict, "params": dict}``, params being the member's resolved
        config, nested as ``MLflowLogger.log_hyperparams`` takes it. Names get MLflowLogger's `` (2)``, `` (3)``, ...
        when the experiment (or an earlier member) has them."""
        super().__init__()
        _check(members)
        self.uri, self.outage_wait = uri, outage_wait
        # the parent is a plain run: MLflowLogger creates the experiment (artifact location, kind tag) and names it;
        # its metrics go through this logger's sender, never through one of its own
        self._parent = MLflowLogger(uri, experiment, parent_name, {**parent_tags, "population.size": len(members)},
                                    outage_wait=outage_wait)
        self.parent_run_id: str = self._parent.run_id
        self.experiment_id: str = self._parent.experiment_id
        self.run_ids: list[str] = _create_members(self.experiment, self.experiment_id, self.parent_run_id, members)
        self._open = dict(enumerate(self.run_ids))  # member -> run id, until its run is ended
        self._spills: dict[str, Path] = {}  # run id -> a closed member's own spill file
        # rows (run id, key, value, timestamp ms, step); every run should get many values per log_batch (each call
        # costs ~4.5 ms whatever it carries), so the buffer holds ~1000 values per run before it goes
        self._buffer: list[tuple] = []
        self._flush_at = 1000 * (len(members) + 1)
        self._last_flush = time.monotonic()
        self._sender: _Sender | None = _Sender(self.experiment)

    # --- Lightning's Logger interface -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._parent.name

    @property
    def version(self) -> str:
        return self.parent_run_id

    @property
    def experiment(self):
        """The ``MlflowClient``."""
        return self._parent.experiment

    def log_hyperparams(self, params) -> None:
        """To the parent run (each member's params were logged when its run was created)."""
        self._parent.log_hyperparams(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """To the parent run."""
        now = int(time.time() * 1000)
        self._add([(self.parent_run_id, k, float(v), now, step or 0) for k, v in metrics.items()])

    def finalize(self, status: str) -> None:
        # as MLflowLogger: the runs are ended by close, which knows the reason of a failure
        self._flush()

    # --- ours ---------------------------------------------------------------------------------------------------
    def log_member_metrics(self, rows: dict[int, dict[str, float]], step: int) -> None:
        """``rows[k]``: member k's metrics at ``step``; queued, and sent in batches by the sender thread. Values must
        be numbers (``losses.tolist()`` of a [K] tensor), not tensors that a later step may overwrite. Rows of a
        member already closed are dropped: its run has ended."""
        now = int(time.time() * 1000)
        added = []
        for k, metrics in rows.items():
            run_id = self._open.get(k)
            if run_id is None:
                if not 0 <= k < len(self.run_ids):
                    raise ConfigError(f"log_member_metrics: member must be in 0..{len(self.run_ids) - 1}, got {k!r}")
                continue
            added += [(run_id, key, float(value), now, step) for key, value in metrics.items()]
        self._add(added)

    def close_member(self, k: int, status: str = "FINISHED", reason: str | None = None, artifacts=(),
                     spill: Path | None = None) -> None:
        """Ends member k's run (the others go on), after its queued metrics; ``artifacts`` are uploaded to it and a
        ``reason`` becomes its ``failure_reason`` tag, as for a standalone run. Returns at once: the sender does it,
        so the files must stay until ``close``, which reports any error. ``spill``: where this member's undelivered
        metrics go if the server stays away at ``close`` (else ``close``'s file)."""
        if k not in self._open:
            raise ConfigError(f"close_member: member {k!r} is not an open member (0..{len(self.run_ids) - 1})")
        missing = [str(p) for p in artifacts if not Path(p).is_file()]
        if missing:  # the upload happens later, off this thread: a wrong path must fail here
            raise ConfigError(f"close_member: artifacts must be existing files, got {missing}")
        run_id = self._open.pop(k)
        if spill is not None:
            self._spills[run_id] = Path(spill)
        self._flush()  # its metrics are queued before its end
        self._sender.send(_End(run_id, status, reason, tuple(map(str, artifacts))))

    def close(self, status: str = "FINISHED", reason: str | None = None, artifacts=(), spill: Path | None = None):
        """Ends every open member's run with ``status`` and ``reason``, then the parent (``artifacts`` go to the
        parent). As ``MLflowLogger.close``: a server still away ``outage_wait`` s after the end keeps the
        undelivered metrics in ``spill`` (JSON lines, MLflowLogger's with a ``run_id`` field; a closed member's own
        ``spill`` if it gave one), raises ``TrackingUnavailable``, and the runs not ended stay RUNNING."""
        if self._sender is None:
            return
        self._flush()
        for k in list(self._open):
            self._sender.send(_End(self._open.pop(k), status, reason, ()))
        sender, self._sender = self._sender, None
        try:
            sender.stop(self.outage_wait)
            undelivered, outage = [], None
        except TrackingUnavailable as exc:
            undelivered, outage = exc.args[1], exc.args[0]
        if undelivered or sender.unended:
            metrics = (f"its {len(undelivered)} undelivered metric values are {self._spill(undelivered, spill)}"
                       if undelivered else "its metrics were delivered")
            raise TrackingUnavailable(
                f"{outage or f'the tracking server did not answer ({sender.outage})'}; {metrics}, and the parent run "
                f"{self.parent_run_id} and {len(sender.unended)} member runs stay RUNNING")
        self._parent.close(status, reason, artifacts)

    def _add(self, rows: list[tuple]) -> None:
        self._buffer += rows
        if len(self._buffer) >= self._flush_at or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        """Hands the buffered rows to the sender thread (a list handed over, not copied)."""
        if self._buffer and self._sender is not None:
            batch, self._buffer = self._buffer, []
            self._sender.send(batch)
        self._last_flush = time.monotonic()

    def _spill(self, rows: list[tuple], spill: Path | None) -> str:
        """Writes ``rows`` to the closed members' own spill files, the rest to ``spill``; says where they went."""
        files: dict[Path | None, list[tuple]] = {}
        for row in rows:
            files.setdefault(self._spills.get(row[0], spill), []).append(row)
        lost = files.pop(None, [])
        for path, mine in files.items():
            with open(path, "w") as f:
                f.writelines(json.dumps({"run_id": run_id, "key": key, "value": value, "step": step,
                                         "timestamp": timestamp}) + "\n"
                             for run_id, key, value, timestamp, step in mine)
        if not files:
            return "lost"
        return f"kept in {', '.join(sorted(map(str, files)))}" + (f" ({len(lost)} lost)" if lost else "")


_NOTHING = object()


@dataclasses.dataclass(frozen=True)
class _End:
    """A member run's end, queued after its metrics."""

    run_id: str
    status: str
    reason: str | None
    artifacts: tuple[str, ...]


class _Sender(Sender):
    """``Sender`` for many runs: one thread writes the rows of every run of the population (one ``log_batch`` per
    run and batch) and ends member runs (``_End``), in the order they were queued. Its ``stop`` is Sender's; the runs
    whose end was not reached before the deadline are in ``unended``."""

    def __init__(self, client):
        self.backend = _bulk.store(client)  # a database: metrics, ends in one transaction each
        super().__init__(client, run_id=None)
        self.unended: list[str] = []

    def _loop(self) -> None:
        item = self.queue.get()
        while item is not None:
            given_up = self.error is not None or self.undelivered or self.unended
            if isinstance(item, _End):  # with the ends queued right after it: one transaction on a database store
                ends = [item]
                while isinstance(item := self._queued(), _End):
                    ends.append(item)
                if given_up:
                    self.unended += [end.run_id for end in ends]
                else:
                    self._end(ends)
                if item is _NOTHING:
                    item = self.queue.get()
                continue
            if given_up:  # keep the rest in order for the spill file
                self.undelivered += item
            else:
                self._deliver(item)
            item = self.queue.get()

    def _queued(self):
        """The next item already queued, or ``_NOTHING``."""
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return _NOTHING

    def _deliver(self, rows: list[tuple]) -> None:
        from mlflow.entities import Metric

        if self.backend is not None:  # every run's rows in one transaction (see _bulk)
            try:
                _retrying(lambda: self.deadline, _bulk.log_metrics, self.backend, rows)
                return
            except TrackingUnavailable as exc:
                self.outage = exc.reason
                self.undelivered += rows
                return
            except Exception:  # e.g. a row already there: log_batch skips those, one run at a time
                pass
        by_run: dict[str, list[tuple]] = {}
        for row in rows:
            by_run.setdefault(row[0], []).append(row)
        runs = list(by_run.values())
        for r, mine in enumerate(runs):
            for i in range(0, len(mine), 1000):  # MLflow's limit per batch
                metrics = [Metric(key, value, timestamp, step) for _, key, value, timestamp, step in mine[i:i + 1000]]
                try:
                    # no deadline while training goes on, stop()'s once it ends
                    _retrying(lambda: self.deadline, self.client.log_batch, mine[0][0], metrics=metrics)
                except TrackingUnavailable as exc:
                    self.outage = exc.reason
                    self.undelivered += mine[i:] + [row for later in runs[r + 1:] for row in later]
                    return
                except Exception as exc:  # kept for stop(): a failure must not pass silently
                    self.error = exc
                    return

    def _end(self, ends: list[_End]) -> None:
        """MLflowLogger.close's end of each run: its artifacts, the reason of a failure as a tag, its status; the
        tags and statuses of all ``ends`` in one transaction where the store is a database."""
        def deadline():
            return self.deadline

        try:
            uploading = [e.run_id for e in ends if e.artifacts]
            repos = (_retrying(deadline, _bulk.artifact_repos, self.backend, self.client.tracking_uri, uploading)
                     if self.backend is not None and uploading else {})
            for end in ends:
                for path in end.artifacts:
                    if end.run_id in repos:
                        _retrying(deadline, repos[end.run_id].log_artifact, path)
                    else:
                        _retrying(deadline, self.client.log_artifact, end.run_id, path)
            if self.backend is not None:
                _retrying(deadline, _bulk.end_runs, self.backend, [(e.run_id, e.status, e.reason) for e in ends],
                          int(time.time() * 1000))
                return
            for end in ends:
                if end.reason:
                    _retrying(deadline, self.client.set_tag, end.run_id, "failure_reason", end.reason[:5000])
                _retrying(deadline, self.client.set_terminated, end.run_id, status=end.status)
        except TrackingUnavailable as exc:
            self.outage = exc.reason
            self.unended += [end.run_id for end in ends]
        except Exception as exc:
            self.error = exc


def _check(members: list[dict]) -> None:
    if not members:
        raise ConfigError("PopulationLogger: members must name at least one member, got []")
    for k, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("run_name"), str) or set(member) - MEMBER_KEYS:
            raise ConfigError(f"PopulationLogger: members[{k}] must be a dict with a run_name and optional tags and "
                              f"params, got {member!r:.200}")


def _create_members(client, experiment_id: str, parent_id: str, members: list[dict]) -> list[str]:
    """One run per member, nested under the parent: its tags go with the run's creation, its params in batches of
    MLflow's 100, after one query per distinct name for unique names."""
    from mlflow.entities import Param

    backend = _bulk.store(client)
    names = _unique_names(client, experiment_id, [m["run_name"] for m in members], backend)
    runs = []
    for k, (member, name) in enumerate(zip(members, names)):
        tags = {**{key: str(v) for key, v in member.get("tags", {}).items() if v is not None},
                "mlflow.parentRunId": parent_id, "population.parent": parent_id, "population.member": str(k)}
        # exactly MLflowLogger.log_hyperparams' params: flattened, values cut at MLflow's 6000 characters
        params = [Param(key, v[:6000]) for key, v in sorted(flatten(member.get("params", {})).items())]
        runs.append((name, tags, params))
    if backend is not None:  # all of them in one transaction (see _bulk)
        return _bulk.create_runs(backend, experiment_id, runs, int(time.time() * 1000))
    run_ids = []
    for name, tags, params in runs:
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        run_ids.append(run_id)
    return run_ids


def _unique_names(client, experiment_id: str, names: list[str], backend=None) -> list[str]:
    """MLflowLogger's rule for many names at once: a name the experiment, or an earlier member, has already gets
    `` (2)``, `` (3)``, ... One query for all on a database store, else one per distinct name, MLflowLogger's
    (MLflow's search has no OR, and its IN takes run ids only)."""
    bases = sorted({n for n in names if n})
    taken = _bulk.taken_names(backend, experiment_id, bases) if backend is not None else set()
    for base in bases if backend is None else ():
        quoted = (base + "%").replace("'", "\\'")
        runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}'",
                                  max_results=50000)
        taken |= {r.info.run_name for r in runs}
    unique = []
    for name in names:
        candidate, i = name, 1
        while candidate and candidate in taken:
            i += 1
            candidate = f"{name} ({i})"
        taken.add(candidate)
        unique.append(candidate)
    return unique
