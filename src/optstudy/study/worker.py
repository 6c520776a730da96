"""A study worker: asks Optuna for a configuration, trains it once per seed, tells the mean; until the budget is spent.

Any number of workers on any machines share one storage. The first to arrive creates the study, its MLflow parent
run, and enqueues the grid or the papers' defaults; the others wait for that and join. A failed or diverged trial is
recorded with its reason (user attr ``fail_reason``) and the worker goes on. A worker killed mid-trial leaves a
RUNNING trial that is failed and re-enqueued: by Optuna's heartbeats on a database storage, and on a journal file by
the next worker on the same host, which sees that the trial's process is gone.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

import optstudy.optim as optim
from optstudy.callbacks import OptunaPruning
from optstudy.config import TrackingUnreachable, compose, validate
from optstudy.early import record_trial
from optstudy.errors import ConfigError, OptstudyError
from optstudy.study.spec import Study
from optstudy.study.storage import open_storage
from optstudy.tracking import TrackingUnavailable

# a trial's runs keep their effective-lr histograms; the report draws the best runs' heatmaps from them, so drawing
# every run's (~0.3 s, a quarter of a digits trial's overhead) is skipped (++: logger=none has no such key)
NO_HEATMAP = ("++logger.eff_lr_heatmap=false",)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --- configuration of one trial -------------------------------------------------------------------------------------
def suggest(trial: optuna.Trial, study: Study) -> dict:
    """The trial's params: the optimizer, then its own space, then its bound schedule's (conditional spaces)."""
    grid = study.sampler["name"] == "grid"
    name = trial.suggest_categorical("optimizer", list(study.spaces))
    space = study.spaces[name]
    params = {"optimizer": name, **{p.name: p.suggest(trial, grid) for p in space.params}}
    if space.bounds:
        bound = trial.suggest_categorical("bound", list(space.bounds))
        params.update(bound=bound, **{p.name: p.suggest(trial, grid) for p in space.bounds[bound]})
    return params


def overrides_for(params: dict) -> list[str]:
    """Hydra overrides that put a trial's params into train.py's config."""
    out = [f"optimizer={params['optimizer']}"]
    if "bound" in params:
        out.append(f"bound={params['bound']}")
    for key, value in assignments(params).items():
        out.append(f"{key}=[{value[0]},{value[1]}]" if isinstance(value, list) else f"{key}={value}")
    return out


def assignments(params: dict) -> dict:
    """A trial's searched values as config keys: ``{"optimizer.lr": 0.001, "optimizer.betas": [0.9, 0.99], ...}``
    (the optimizer and bound schedule, which pick config groups, left out)."""
    out = {}
    for key, value in params.items():
        if key in ("optimizer", "bound", "beta1", "beta2"):
            continue
        # gamma is the hyperbolic schedule's parameter: conf/bound/hyperbolic.yaml holds it
        # a dotted key (bound.rate, data.order) is a config key already
        out["bound.gamma" if key == "gamma" else key if "." in key else f"optimizer.{key}"] = value
    betas = {k: params[k] for k in ("beta1", "beta2") if k in params}
    if betas:  # a beta not searched keeps the optimizer's default
        default = optim.defaults(params["optimizer"])["betas"]
        out["optimizer.betas"] = [betas.get("beta1", default[0]), betas.get("beta2", default[1])]
    return out


# --- what a study's trials share ------------------------------------------------------------------------------------
# where results go or how fast they come, not what they are
NOT_IDENTITY = ("hydra", "logger", "tags", "checkpoint", "ckpt_path", "result_file", "trainer.threads",
                "trainer.enable_progress_bar")


def identity(base) -> dict[str, str]:
    """Every setting of the composed base config that shapes a trial, flattened (``trainer.max_epochs``: ``"2"``)."""
    from omegaconf import OmegaConf

    from optstudy.tracking import flatten

    flat = flatten({k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                    for k, v in base.items() if k != "hydra"})
    return {k: v for k, v in flat.items() if not k.startswith(NOT_IDENTITY)}


def budget(ident: dict[str, str], spec: Study) -> str:
    """One line for status and the report: ``mlp on digits, 10 epochs, seeds 0, 1, 2``."""
    return (f"{ident.get('model.name', '?')} on {ident.get('data.name', '?')}, {ident.get('trainer.max_epochs', '?')} "
            f"epochs, seeds {', '.join(map(str, spec.seeds))}")


# --- pruning ----------------------------------------------------------------------------------------------------------
class Pruning(OptunaPruning):
    """``OptunaPruning`` of the objective at step ``offset + epoch`` (a trial's seeds continue one curve), reported at
    the end of the training epoch, after its validation and the epoch's other callbacks (the timer's line)."""

    def __init__(self, trial: optuna.Trial, metric: str, offset: int):
        super().__init__(trial, metric, offset)

    def on_validation_end(self, trainer, module):
        pass  # reported in on_train_epoch_end instead

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        self.report(trainer)


# --- the worker -------------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, study: Study, storage_url: str | None = None, overrides: tuple[str, ...] = (),
                 heartbeat: int = 30, threads: int | None = None, population: int | None = None,
                 config_dir: str | None = None):
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a line per trial instead (_print_outcome)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True
        self.spec, self.extra = study, tuple(overrides)
        self.config_dir = config_dir  # the user's config groups (--config-dir), for every trial's compose
        self.population = population or study.population  # trials asked at once (--population, else the file's)
        self.stopped_by: Exception | None = None  # an error that ends this worker after the trial it failed
        env_threads = os.environ.get("OMP_NUM_THREADS", "")
        self.threads = threads or (int(env_threads) if env_threads.isdigit() else None)
        self.storage, self.storage_url = open_storage(storage_url, heartbeat)
        # fails now, once, for a bad override in the study or CLI
        base = compose([*study.overrides, *self.extra], config_dir)
        validate(base)  # and for a bad value or a tracking server that does not answer: not once per trial
        self.objective = study.objective or base.objective
        self.identity = identity(base)
        self.epochs = int(base.trainer.max_epochs)
        self.ddp = "ddp" in str(base.trainer.get("strategy", ""))
        self.study = self._join()

    # study creation, once, by whichever worker comes first
    def _join(self) -> optuna.Study:
        kwargs = dict(study_name=self.spec.name, storage=self.storage, direction=self.spec.direction,
                      sampler=make_sampler(self.spec), pruner=make_pruner(self.spec, self.epochs))
        try:
            study = optuna.create_study(**kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            # a joining worker draws its own random numbers: with the creator's seed it would propose the same
            # configurations (a single worker stays reproducible from the study's seed)
            study = optuna.load_study(study_name=self.spec.name, storage=self.storage,
                                      sampler=make_sampler(self.spec, offset=os.getpid()), pruner=kwargs["pruner"])
            return self._check_identity(self._wait_ready(study))
        self._initialise(study)
        return study

    def _initialise(self, study: optuna.Study) -> None:
        from optstudy.study.tracking import create_parent

        uri, parent, experiment_id = create_parent(self.spec)
        attrs = dict(objective=self.objective, direction=self.spec.direction, optimizers=list(self.spec.spaces),
                     seeds=list(self.spec.seeds), spec=self.spec.source, mlflow_experiment=self.spec.name,
                     mlflow_parent_run_id=parent, tracking_uri=uri, n_trials=self.spec.n_trials,
                     mlflow_experiment_id=experiment_id,
                     overrides=list(self.extra), identity=self.identity, budget=budget(self.identity, self.spec))
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        points = self.spec.grid() if self.spec.sampler["name"] == "grid" else (
            self.spec.defaults() if self.spec.enqueue_defaults else [])
        for point in points:
            study.enqueue_trial(point)
        study.set_user_attr("ready", True)  # last: the other workers wait for it

    def _check_identity(self, study: optuna.Study) -> optuna.Study:
        """A worker whose study file or overrides shape trials differently is refused: its trials would be mixed
        with the others' as if comparable (a 10-epoch trial "best" in a 2-epoch study)."""
        attrs = study.user_attrs
        if attrs.get("spec") not in (None, self.spec.source):
            raise ConfigError(f"study {self.spec.name!r}: this study file differs from the one the study was started "
                              "with; give the changed study another name (name: in the file)")
        theirs = attrs.get("identity")
        if theirs is None:  # started before studies recorded it
            return study
        differ = sorted(k for k in {*theirs, *self.identity} if theirs.get(k) != self.identity.get(k))
        differ = [k for k in differ if k not in self._added_since(theirs)]
        if differ:
            shown = "; ".join(f"{k}: study {theirs.get(k, '(unset)')}, this worker {self.identity.get(k, '(unset)')}"
                              for k in differ[:5])
            raise ConfigError(f"study {self.spec.name!r} was started with other settings ({shown}; started with "
                              f"overrides {attrs.get('overrides') or 'none'}); run this worker with the same "
                              "overrides, or give the study another name")
        return study

    def _wait_ready(self, study: optuna.Study, timeout: float = 120) -> optuna.Study:
        deadline = time.monotonic() + timeout
        while not study.user_attrs.get("ready"):
            if time.monotonic() > deadline:
                raise OptstudyError(f"study {self.spec.name!r} exists in {self.storage_url} but its first worker never "
                                    f"finished setting it up; delete it (optuna delete-study) and start again")
            time.sleep(0.5)
        return study

    def _added_since(self, theirs: dict) -> set[str]:
        """Keys a newer optstudy added (the study never recorded them) that this worker leaves at their defaults
        for its model, data, optimizer... choices: trials shaped as the study's were, so a study started before an
        upgrade goes on. A new key set to something else is a difference."""
        new = {k for k in self.identity if k not in theirs}
        if not new:
            return set()
        groups = [o for o in (*self.spec.overrides, *self.extra) if "=" in o and "." not in o.split("=")[0]]
        defaults = identity(compose(groups, self.config_dir))
        return {k for k in new if self.identity[k] == defaults.get(k)}

    # the loop
    def run(self, n_trials: int | None = None) -> int:
        """Runs trials until the study's budget (or this worker's ``n_trials``) is spent; returns how many."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminated)  # scancel, pre-emption, docker stop: queue the trial again
        done = 0
        uri = self.study.user_attrs.get("tracking_uri")
        if uri:  # once per worker, not once per run
            from optstudy.tracking import ui_command

            print(f"study {self.spec.name}: runs in MLflow experiment {self.spec.name!r}; open it with: "
                  f"{ui_command(uri, self.study.user_attrs.get('mlflow_experiment_id'))}", flush=True)
        while n_trials is None or done < n_trials:
            retry_dead_trials(self.study, self.storage)
            if hasattr(self.storage, "record_heartbeat"):  # a database storage with heartbeats
                # fail (and so retry) the trials of dead workers now: counted as RUNNING they would hold budget
                optuna.storages.fail_stale_trials(self.study)
            if not self._budget_left() and not self._await_running():
                break
            if self.population > 1:
                from optstudy.study.population import run_population

                done += run_population(self, self.population)
            else:
                self.study.optimize(self._objective, n_trials=1, catch=(Exception,), gc_after_trial=False,
                                    callbacks=[_print_outcome])
                done += 1
            if self.stopped_by is not None:  # its trial is queued again for a worker that can reach the server
                raise self.stopped_by
        return done

    def _await_running(self) -> bool:
        """Nothing left to ask, but other workers' trials are RUNNING: on a database, wait until they end or their
        heartbeats go stale (then they are failed and queued again: True, there is work). Otherwise a killed worker's
        trials would stay RUNNING once the last live worker had left. A journal file's dead workers on this host were
        just retried; others' trials cannot be judged from here, so no wait there."""
        if not hasattr(self.storage, "record_heartbeat"):
            return False
        said = False
        while any(t.state == TrialState.RUNNING for t in self.study.get_trials(deepcopy=False)):
            if not said:
                print("waiting for other workers' running trials (retried here if their worker died)", flush=True)
                said = True
            time.sleep(self.storage.get_heartbeat_interval())
            retry_dead_trials(self.study, self.storage)  # those that never beat: the heartbeat check skips them
            optuna.storages.fail_stale_trials(self.study)
            if self._budget_left():
                return True
        return False

    def _budget_left(self) -> int:
        """How many more trials this study may ask (grid: the points still waiting)."""
        trials = self.study.get_trials(deepcopy=False)
        if self.spec.sampler["name"] == "grid":
            return sum(t.state == TrialState.WAITING for t in trials)
        retried = {t.system_attrs.get("failed_trial") for t in trials} | {t.user_attrs.get("retry_of") for t in trials}
        spent = [t for t in trials if (t.state in FINISHED and t.number not in retried and
                                       not t.user_attrs.get("surplus")) or t.state == TrialState.RUNNING]
        return max(self.spec.n_trials - len(spent), 0)

    def _objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        self._share_cores()
        if self.spec.sampler["name"] == "grid" and "fixed_params" not in self._system_attrs(trial):
            # another worker took the last grid point between our check and our ask: not a configuration
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("surplus: the grid was exhausted by another worker")
        values, runs, seconds = [], [], 0.0
        try:
            params = suggest(trial, self.spec)
            for i, seed in enumerate(self.spec.seeds):
                value, run_id, train_seconds = self._train(trial, params, seed, offset=i * self.epochs)
                values.append(value)
                runs.append(run_id)
                seconds += train_seconds
                trial.set_user_attr("train_seconds", seconds)  # epochs only: the rest of the trial is overhead
                trial.set_user_attr("seed_values", values)
                trial.set_user_attr("mlflow_run_ids", runs)
                trial.set_user_attr("mlflow_run_id", runs[0])
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:2000])
            if isinstance(exc, (TrackingUnavailable, TrackingUnreachable)):  # the server's fault: run it again
                requeue(self.study, trial)
            if isinstance(exc, TrackingUnreachable):  # gone before the trial started: so would every next one be
                self.stopped_by = exc
            raise
        except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (Lightning's SIGTERMException)
            # not the configuration's fault: queue it again for whichever worker runs next
            trial.set_user_attr("fail_reason", f"worker stopped ({type(exc).__name__})")
            requeue(self.study, trial)
            # Optuna fails the trial on KeyboardInterrupt but leaves it RUNNING on SystemExit
            raise KeyboardInterrupt(str(exc)) from exc
        value = statistics.fmean(values)
        if not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"non-finite objective {value}")
            raise OptstudyError(f"trial {trial.number}: non-finite objective {value}")
        return value

    def _share_cores(self) -> None:
        """Torch threads = this machine's cores / the workers training on it now (``threads`` fixes it). Two
        workers with all cores each oversubscribe them, and OpenMP's barriers then spin: on 2 cores, 2 workers
        did fewer trials per hour than 1 (580 against 1480) until each took one core."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
            return
        host = socket.gethostname()
        local = {(t.user_attrs.get("worker") or {}).get("pid") for t in
                 self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if (t.user_attrs.get("worker") or {}).get("host") == host}
        alive = sum(1 for pid in local if pid and _alive(pid)) or 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // alive))

    def _system_attrs(self, trial: optuna.Trial) -> dict:
        study_id = self.storage.get_study_id_from_name(self.spec.name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        return self.storage.get_trial_system_attrs(trial_id)

    def _train(self, trial, params, seed, offset) -> tuple[float, str | None, float]:
        with tempfile.TemporaryDirectory(prefix="optstudy-trial-") as tmp:  # artifacts are copied into MLflow
            overrides = [*self.spec.overrides, *overrides_for(params), f"seed={seed}", f"objective={self.objective}",
                         f"logger.experiment={self.spec.name}", *NO_HEATMAP, "checkpoint.enabled=false",
                         f"checkpoint.dir={tmp}",
                         *self._tags(trial, seed), *self.extra]
            if self.ddp:
                return train_in_subprocess(overrides, self.config_dir)
            from optstudy.train import train

            result = train(compose(overrides, self.config_dir), callbacks=[Pruning(trial, self.objective, offset)])
            record_trial(trial, result.metrics, self.epochs)  # trainer.early_stopping's outcome, when it is on
        return result.value, result.run_id, sum(result.epoch_seconds)

    def _tags(self, trial, seed) -> list[str]:
        attrs = self.study.user_attrs
        tags = [f"+tags.optuna.study={self.spec.name}", f"+tags.optuna.trial={trial.number}", f"+tags.seed={seed}",
                f"+tags.mlflow.parentRunId={attrs['mlflow_parent_run_id']}"]
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # all trials go where the study's parent run is
            tags.append(f"++logger.tracking_uri='{attrs['tracking_uri']}'")  # ++: logger=none has no such key
        return tags


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _print_outcome(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per trial (Optuna's own log of a failure is a traceback; the reason is in the trial's attrs)."""
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        outcome = f"{study.user_attrs.get('objective', 'value')}={trial.value:.6g}"
    elif trial.state == TrialState.FAIL:
        outcome = f"failed: {trial.user_attrs.get('fail_reason', '?')}"
    else:
        outcome = trial.state.name.lower()
    print(f"trial {trial.number} {outcome}  ({params})", flush=True)


def train_in_subprocess(overrides: list[str], config_dir: str | None = None) -> tuple[float, str | None, float]:
    """A multi-device trial: ``optstudy train`` in its own process (with the worker's ``--config-dir``), because
    Lightning's DDP re-executes ``sys.argv`` for the other ranks (a study driver in DDP mode would start more drivers).
    No pruning across the process boundary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        where = ["--config-dir", str(config_dir)] if config_dir else []
        proc = subprocess.run([sys.executable, "-m", "optstudy", "train", *where, *overrides, f"+result_file={out}"],
                              cwd=os.getcwd(), capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise OptstudyError(f"optstudy train exited with {proc.returncode}: {' | '.join(tail)}")
        result = json.loads(out.read_text())
    return result["value"], result.get("run_id"), sum(result.get("epoch_seconds", []))


def retry_dead_trials(study: optuna.Study, storage) -> None:
    """Fail the RUNNING trials whose worker process on this host is gone, and those that never got as far as naming
    their worker (killed between Optuna's ask and the next write; a database's heartbeats never see them either),
    and enqueue their params again. Database storages also retry through Optuna's heartbeats (other hosts)."""
    host = socket.gethostname()
    beat = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    unnamed_after = max(2 * beat, 10) if beat else 60  # seconds: a live worker names itself within milliseconds
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:
            if t.datetime_start is None or (now - t.datetime_start).total_seconds() < unnamed_after:
                continue
            reason = "its worker died before naming itself"
        elif worker.get("host") != host or _alive(worker.get("pid")):
            continue
        else:
            reason = f"worker process {worker.get('pid')} died"
        study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:  # attrs first: a finished trial takes no more writes
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            failed = storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            failed = False  # another worker of this host got there first
        if failed:
            requeue(study, t)


def requeue(study: optuna.Study, trial) -> None:
    """The trial's params again, as a new WAITING trial that names the one it replaces (the budget skips that one)."""
    params = trial.params or trial.system_attrs.get("fixed_params")  # a grid point killed before it suggested
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})


def _alive(pid) -> bool:
    if not pid:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_sampler(spec: Study, offset: int = 0) -> optuna.samplers.BaseSampler:
    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    if offset:
        options["seed"] = (options.get("seed") or 0) + offset
    name = spec.sampler["name"]
    try:
        if name == "tpe":
            # multivariate + group: the spaces are conditional on the optimizer; constant_liar: parallel workers
            return optuna.samplers.TPESampler(**{"multivariate": True, "group": True, "constant_liar": True,
                                                 **options})
        if name == "qmc":
            return optuna.samplers.QMCSampler(**{"scramble": True, **options})
        if name == "cmaes":  # continuous parameters; a categorical (the optimizer) is sampled at random
            return optuna.samplers.CmaEsSampler(**{"warn_independent_sampling": False, **options})
        return optuna.samplers.RandomSampler(**options)  # random, and grid (whose points are all enqueued)
    except TypeError as exc:
        raise ConfigError(f"sampler: {exc}") from None


def make_pruner(spec: Study, epochs: int) -> optuna.pruners.BasePruner:
    options = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner["name"]
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**{"n_startup_trials": 5, "n_warmup_steps": 1, **options})
        if name == "percentile":
            return optuna.pruners.PercentilePruner(**{"percentile": 25.0, "n_startup_trials": 5, "n_warmup_steps": 1,
                                                      **options})
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**{"min_resource": 1, **options})
        if name == "hyperband":
            total = epochs * len(spec.seeds)  # a trial reports once per epoch of each seed
            return optuna.pruners.HyperbandPruner(**{"min_resource": 1, "max_resource": total, **options})
        return optuna.pruners.NopPruner()
    except TypeError as exc:
        raise ConfigError(f"pruner: {exc}") from None
