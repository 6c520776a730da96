"""Population studies: the worker asks Optuna for up to K trials at once and trains them as populations.

Each trial is still an ordinary Optuna trial: its own params, value (the mean over the study's seeds),
intermediate values, ``mlflow_run_ids``, and the user attrs ``population`` (the population's MLflow parent run) and
``population_members`` (its members' indices there). A trial's members are its seeds: K trials x S seeds train as
one population of K·S members. What a population must share (the optimizer, its flags and the bound family; the
model, data and budget, which the study fixes) groups the trials; each group is one population.

How each sampler is asked for K: grid points are the enqueued trials, taken K at a time; random and QMC draw K
independent points; TPE runs with ``constant_liar`` (the worker's default), so each of the K asks sees the earlier
ones as running with a pessimistic value and proposes elsewhere; CMA-ES (``sampler: {name: cmaes, popsize: K}``)
draws K points of its current generation, one generation a population; its search space is what finished trials
share, so a study's first population is drawn at random.

Pruning: every member reports its objective after each epoch at its standalone step (seed i's epoch e at
``i * epochs + e``); a pruned trial's members are frozen, cut from the stack once a quarter of it has stopped
(``PopulationTask._compact``), and the trial is told PRUNED. Optuna's median and percentile pruners compare only
with finished trials, so they prune nothing within a study's first population; Hyperband and successive halving
compare with the trials that reported at the same step, running ones included, so they prune within a population.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import tempfile
import threading

import optuna
import pytorch_lightning as pl
from optuna.trial import TrialState

from optstudy.config import TrackingUnreachable, compose
from optstudy.early import record_trial
from optstudy.tracking import TrackingUnavailable


def run_population(worker, k: int) -> int:
    """Asks up to ``k`` trials, trains them as populations, tells each its outcome; returns how many."""
    from optstudy.study.worker import suggest

    asked = _ask(worker, k, suggest)
    with Heartbeats(worker.storage, [t for t, _ in asked]) as beats:
        _run_groups(worker, asked, beats)
    return len(asked)


def _run_groups(worker, asked: list, beats: "Heartbeats") -> None:
    from optstudy.study.worker import _print_outcome, assignments

    groups: dict[tuple, list] = {}
    for trial, params in asked:
        groups.setdefault((params["optimizer"], params.get("bound")), []).append((trial, params))
    for (name, bound), group in groups.items():
        try:
            outcomes = _train_group(worker, name, bound, group, assignments)
        except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, SIGTERM: not the configurations' fault
            _fail(worker, group, f"worker stopped ({type(exc).__name__})", retry=True)
            raise KeyboardInterrupt(str(exc)) from exc
        except Exception as exc:  # as a trial of its own would: recorded failed, the worker goes on
            tracking = isinstance(exc, (TrackingUnavailable, TrackingUnreachable))  # the server's: run them again
            _fail(worker, group, f"{type(exc).__name__}: {exc}"[:2000], retry=tracking)
            if isinstance(exc, TrackingUnreachable):  # gone before training: so would every next one be
                worker.stopped_by = exc
            continue
        for (trial, _), (state, value) in zip(group, outcomes):
            beats.done(trial)
            _print_outcome(worker.study, worker.study.tell(trial, value, state=state))


class Heartbeats:
    """Optuna records a trial's heartbeat only while ``study.optimize`` runs it; asked trials need their own, or a
    killed worker's population would stay RUNNING on a database forever (``fail_stale_trials`` skips trials that
    never beat). One thread beats for all of a population's trials until each is told."""

    def __init__(self, storage, trials: list):
        self.storage, self.ids = storage, {t._trial_id for t in trials}
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.stop = threading.Event()

    def __enter__(self) -> "Heartbeats":
        if self.interval:
            self.beat()  # now: a kill in the first interval must leave trials that can go stale
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    def beat(self) -> None:
        for trial_id in list(self.ids):
            self.storage.record_heartbeat(trial_id)

    def done(self, trial) -> None:
        self.ids.discard(trial._trial_id)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()


def _fail(worker, group: list, reason: str, retry: bool) -> None:
    from optstudy.study.worker import _print_outcome, requeue

    for trial, _ in group:
        trial.set_user_attr("fail_reason", reason)
        if retry:
            requeue(worker.study, trial)
        _print_outcome(worker.study, worker.study.tell(trial, state=TrialState.FAIL))


def _ask(worker, k: int, suggest) -> list:
    """Up to ``k`` new trials with their params (grid: the enqueued points still waiting)."""
    out = []
    grid = worker.spec.sampler["name"] == "grid"
    for _ in range(min(k, worker._budget_left())):
        trial = worker.study.ask()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        if hasattr(worker.storage, "record_heartbeat"):  # now: killed before its population beats, it goes stale
            worker.storage.record_heartbeat(trial._trial_id)
        if grid and "fixed_params" not in worker._system_attrs(trial):
            # another worker took the last grid points between our count and our ask: not a configuration
            trial.set_user_attr("surplus", True)
            worker.study.tell(trial, state=TrialState.PRUNED)
            break
        out.append((trial, suggest(trial, worker.spec)))
    return out


def _train_group(worker, name: str, bound: str | None, group: list, assignments) -> list[tuple]:
    """One population for ``group``'s trials x the study's seeds; returns (state, value) per trial."""
    from optstudy.population.run import train_population
    from optstudy.study.worker import NO_HEATMAP

    spec, seeds = worker.spec, list(worker.spec.seeds)
    attrs = worker.study.user_attrs
    settings, owners = [], []
    for i, (trial, params) in enumerate(group):
        for seed in seeds:
            tags = {"tags.optuna.study": spec.name, "tags.optuna.trial": trial.number, "tags.seed": seed}
            settings.append({**assignments(params), "seed": seed, **tags})
            owners.append(i)
    worker._share_cores()
    with tempfile.TemporaryDirectory(prefix="optstudy-population-") as tmp:
        overrides = [*spec.overrides, f"optimizer={name}", *([f"bound={bound}"] if bound else []),
                     f"objective={worker.objective}", f"logger.experiment={spec.name}", *NO_HEATMAP,
                     "checkpoint.enabled=false",
                     f"checkpoint.dir={tmp}", f"+tags.mlflow.parentRunId={attrs['mlflow_parent_run_id']}",
                     f"+tags.optuna.study={spec.name}", f"logger.run_name='{name} population of {len(settings)}'",
                     *worker.extra]
        if not os.environ.get("MLFLOW_TRACKING_URI") and attrs.get("tracking_uri"):
            overrides.append(f"++logger.tracking_uri='{attrs['tracking_uri']}'")
        pruning = PopulationPruning([t for t, _ in group], owners, seeds, worker.objective, worker.epochs)
        result = train_population(compose(overrides, worker.config_dir), settings, callbacks=[pruning])
    outcomes = []
    for i, (trial, _) in enumerate(group):
        mine = [k for k, owner in enumerate(owners) if owner == i]
        members = [result.members[k] for k in mine]
        runs = [m.run_id for m in members]
        trial.set_user_attr("population", result.parent_run_id)
        trial.set_user_attr("population_members", mine)
        trial.set_user_attr("mlflow_run_ids", runs)
        trial.set_user_attr("mlflow_run_id", runs[0])
        trial.set_user_attr("train_seconds", result.seconds * len(mine) / len(result.members))  # its share
        for m in members:  # trainer.early_stopping's outcome per seed, when it is on
            record_trial(trial, m.metrics, worker.epochs)
        outcomes.append(_outcome(trial, members))
    return outcomes


def _outcome(trial, members) -> tuple:
    if any(m.stopped for m in members):
        return TrialState.PRUNED, None
    diverged = [m.diverged for m in members if m.diverged]
    if diverged:
        trial.set_user_attr("fail_reason", f"Diverged: {diverged[0]}"[:2000])
        return TrialState.FAIL, None
    values = [m.value for m in members]
    trial.set_user_attr("seed_values", values)
    value = statistics.fmean(values)
    if not math.isfinite(value):
        trial.set_user_attr("fail_reason", f"non-finite objective {value}")
        return TrialState.FAIL, None
    return TrialState.COMPLETE, value


class PopulationPruning(pl.Callback):
    """After each epoch, every live member reports its objective to its trial at its standalone step; a trial the
    pruner stops has all its members frozen (``PopulationTask.stop``)."""

    def __init__(self, trials: list, owners: list[int], seeds: list[int], metric: str, epochs: int):
        self.trials, self.owners, self.seeds, self.metric, self.epochs = trials, owners, seeds, metric, epochs

    def on_train_epoch_end(self, trainer, task):  # after this epoch's validation
        alive = set(task.alive())
        for i, trial in enumerate(self.trials):
            mine = [k for k, owner in enumerate(self.owners) if owner == i]
            if not all(k in alive for k in mine):
                continue
            for j, k in enumerate(mine):
                value = task.last[k].get(self.metric)
                if value is not None:
                    trial.report(float(value), j * self.epochs + trainer.current_epoch)
            if trial.should_prune():
                for k in mine:
                    task.stop(k, f"pruned by the study at epoch {trainer.current_epoch + 1}")
