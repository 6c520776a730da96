"""One training run from a composed config: data, model, an optimizer of the core, Lightning, MLflow.

``run(cfg)`` returns the value of ``cfg.objective`` at the end of training, so that studies can optimize it.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only
import torch
from omegaconf import DictConfig, OmegaConf

from optstudy import data, early, models
from optstudy.config import optimizer_kwargs, validate  # noqa: F401  (re-exported for callers)
from optstudy.errors import ConfigError
from optstudy.lit import Diverged, EpochTimer, Task, Trajectory  # noqa: F401  (re-exported for callers)
from optstudy.lrlog import EffectiveLR
from optstudy.tracking import MLflowLogger, flatten, git_commit, tracking_uri, ui_command


def run_name(cfg: DictConfig | dict) -> str:
    """``amsbound lr=0.001 final_lr=0.1 hyperbolic seed=0``: the optimizer and the hyperparameters studies vary.
    A config or its plain dict (a population member's: making a DictConfig of it takes milliseconds)."""
    if cfg["logger"].get("run_name"):
        return cfg["logger"]["run_name"]
    opt = cfg["optimizer"]
    parts = [opt["name"], f"lr={opt['lr']:g}"]
    if "final_lr" in opt:
        parts += [f"final_lr={opt['final_lr']:g}", cfg["bound"]["name"]]
    return " ".join(parts + [f"seed={cfg['seed']}"])


_RUNS = itertools.count()  # several runs of one process in the same second get their own directories


def output_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory under ``train.py``; ``outputs/<time>`` when composed by a library caller."""
    if cfg.checkpoint.get("dir"):
        return Path(cfg.checkpoint.dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None):
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S") / f"{os.getpid()}-{next(_RUNS)}"


def _quiet_lightning():
    # Lightning's start-up lines (accelerators, tips) drown the run's own; its warnings about worker counts are
    # about multi-process loading, which in-memory tensors do not need
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches .* is smaller than the logging.*")


def make_logger(cfg: DictConfig, resume_run: str | None) -> MLflowLogger | None:
    if cfg.logger.name == "none":
        return None
    if cfg.logger.name != "mlflow":
        raise ConfigError(f"logger.name must be mlflow or none, got {cfg.logger.name!r}")
    tags = {"optimizer": cfg.optimizer.name, "model": models.label(cfg.model), "data": data.label(cfg.data),
            "mlflow.source.git.commit": git_commit(), **flatten(OmegaConf.to_container(cfg.tags, resolve=True))}
    return MLflowLogger(tracking_uri(cfg.logger.get("tracking_uri")), cfg.logger.experiment, run_name(cfg), tags,
                        run_id=resume_run, outage_wait=float(cfg.logger.get("outage_wait", 60)))


def trainer_kwargs(cfg: DictConfig) -> dict:
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    kwargs.pop("threads", None)  # ours (set_threads), not Lightning's
    kwargs.pop("delay", None)  # ours too: gradients applied late (optstudy.delay)
    kwargs.pop("early_stopping", None)  # ours too: a callback (optstudy.early), not a Trainer argument
    # a progress bar on a terminal; in job logs and pipes, one line per epoch instead
    kwargs.setdefault("enable_progress_bar", sys.stderr.isatty())
    bad = set(kwargs) - set(inspect.signature(pl.Trainer.__init__).parameters)
    if bad:
        raise ConfigError(f"trainer.{sorted(bad)[0]}: not an argument of Lightning's Trainer")
    return kwargs


SMALL_MODEL = 1_000_000  # parameters


def set_threads(cfg: DictConfig, model: torch.nn.Module) -> None:
    """``trainer.threads`` torch threads; by default one for small models. Their operations are too small to split,
    and OpenMP's barriers make two threads wait on each other whenever another process holds a core: the default
    digits MLP took 41 s instead of 1.3 s beside one busy process on 2 cores (same 1.2 s on an idle machine)."""
    threads = cfg.trainer.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    elif "OMP_NUM_THREADS" not in os.environ and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)


def make_trainer(kwargs: dict, **extra) -> pl.Trainer:
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(**kwargs, **extra, enable_model_summary=False, num_sanity_val_steps=0,
                          use_distributed_sampler=False)  # our sampler shards by rank itself (EpochShuffle)
    except (MisconfigurationException, ValueError) as exc:  # e.g. trainer=gpu on a machine without one
        shown = ", ".join(f"{k}={kwargs[k]}" for k in ("accelerator", "devices", "strategy") if k in kwargs)
        raise ConfigError(f"trainer ({shown}): Lightning refuses it on this machine: {exc}") from None


def _resumed_run(cfg: DictConfig) -> str | None:
    """The MLflow run a checkpoint belongs to, so that resuming continues its curves."""
    if not cfg.get("ckpt_path"):
        return None
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path.resolve()}")
    # mmap: only the small metadata is read here; Lightning loads the weights when it resumes
    meta = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("optstudy", {})
    return meta.get("run_id") if meta.get("tracking_uri") == tracking_uri(cfg.logger.get("tracking_uri")) else None


@dataclasses.dataclass(frozen=True)
class Result:
    value: float  # the objective's final value
    metrics: dict[str, float]  # every metric's last value, and early_stopping/* when it was on (optstudy.early)
    run_id: str | None  # the MLflow run (None with logger=none)
    tracking_uri: str | None
    output_dir: Path  # config, checkpoints, histograms
    epoch_seconds: list[float]  # wall time of each epoch (training and validation)


def run(cfg: DictConfig) -> float:
    """Trains as ``cfg`` says and returns the final value of ``cfg.objective``."""
    return train(cfg).value


def train(cfg: DictConfig, callbacks: list | None = None) -> Result:
    """``run``, returning the MLflow run and every final metric too; ``callbacks``: extra Lightning callbacks
    (a study's pruning callback)."""
    from optstudy.population.members import active

    if active(cfg):
        raise ConfigError("population: train(cfg) trains one model; a config with population.* values is trained by "
                          "optstudy.population.run.train_population(cfg) (python train.py does so)")
    from optstudy import parallel

    if parallel.active(cfg):  # trainer=hogwild|downpour|easgd: processes of their own, a plain torch loop each
        return parallel.train(cfg, callbacks)
    validate(cfg)
    _quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = Task(cfg, data.load(cfg.data, cfg.seed))
    set_threads(cfg, module.model)
    if cfg.objective not in module.metric_names():
        raise ConfigError(f"objective must be one of {', '.join(module.metric_names())}, got {cfg.objective!r}")
    early.check_monitor(cfg, module.metric_names())
    logger = make_logger(cfg, _resumed_run(cfg))
    out = output_dir(cfg)
    kwargs = trainer_kwargs(cfg)
    recorders = _recorders(cfg, module, logger)
    timer = EpochTimer(print_lines=not kwargs["enable_progress_bar"])
    callbacks = [*recorders, timer, *early.callbacks(cfg), *(callbacks or [])]
    if cfg.checkpoint.enabled:
        # last.ckpt only: resuming needs the last state, and a "best" copy would double the disk per run
        callbacks.append(pl.callbacks.ModelCheckpoint(out / "checkpoints", save_top_k=0, save_last=True))
    trainer = make_trainer(kwargs, logger=logger or False, callbacks=callbacks, default_root_dir=out,
                           enable_checkpointing=bool(cfg.checkpoint.enabled))
    module.tracking = {"run_id": logger.run_id if logger else None, "tracking_uri": logger.uri if logger else None}
    if logger is not None and not cfg.get("ckpt_path"):
        logger.log_hyperparams(_resolved(cfg))
    start = time.perf_counter()
    try:
        trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    except BaseException as exc:
        _finish(trainer, logger, recorders, cfg, out, exc)
        if isinstance(exc, Diverged) and logger is not None:
            exc.args = (f"{exc}; MLflow run {logger.run_id} is marked FAILED and keeps its curves up to there",)
        raise
    _finish(trainer, logger, recorders, cfg, out, None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(early.outcome(trainer))  # early_stopping/* when it was on
    value = metrics[cfg.objective]
    if trainer.is_global_zero:
        print(summary_line(cfg, logger, start, value), flush=True)
    return Result(value, metrics, logger and logger.run_id, logger and logger.uri, out, timer.seconds)


def summary_line(cfg: DictConfig, logger, start: float, value: float) -> str:
    """A run's last line: its MLflow run, its name, how long it trained (and, for a command, since its process
    started), the objective, and how to open the run (not in a study: its worker says where the runs are, once)."""
    in_study = OmegaConf.select(cfg, "tags.optuna") is not None
    where = f"; open it with: {ui_command(logger.uri, logger.experiment_id)}" if logger and not in_study else ""
    run_id = f"run {logger.run_id} " if logger else ""
    command = Path(sys.argv[0]).name in ("train.py", "optstudy", "__main__.py")  # not a library caller's
    total = _process_seconds() if command else None
    took = f"trained in {time.perf_counter() - start:.1f}s" + (
        f", {total:.1f}s since the process started" if total is not None and not in_study else "")
    return f"{run_id}'{logger.run_name if logger else run_name(cfg)}' {took}: {cfg.objective} = {value:.6g}{where}"


def _process_seconds() -> float | None:
    """Wall time since this process started (imports, data and tracking included), from Linux's /proc; else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # starttime, field 22
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _resolved(cfg: DictConfig) -> dict:
    """The run's config without Hydra's own node (present when a caller composed with return_hydra_config)."""
    # resolved key by key: Hydra's node has interpolations that only resolve inside a Hydra app
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}


def _recorders(cfg, module, logger) -> list:
    """Callbacks that keep what becomes artifacts: effective-LR histograms, an objective model's trajectory."""
    if logger is None:
        return []
    every = cfg.logger.get("eff_lr_every_n_steps", 25)
    draw = bool(cfg.logger.get("eff_lr_heatmap", True))
    return [EffectiveLR(every, draw=draw)] + ([Trajectory()] if module.task == "objective" else [])


def _finish(trainer, logger, recorders, cfg, out: Path, exc: BaseException | None) -> None:
    """Artifacts and the run's end status, for a finished run and for one that failed on the way."""
    if logger is None or not trainer.is_global_zero:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(_resolved(cfg)))
    paths = [out / "config.yaml"]
    for recorder in recorders:
        paths += recorder.save(out, trainer.lightning_module.model, run_name(cfg))
    keep = dict(artifacts=paths, spill=out / "undelivered_metrics.jsonl")  # the spill: if the server stays away
    if exc is None:
        logger.close("FINISHED", **keep)
    elif isinstance(exc, KeyboardInterrupt):
        logger.close("KILLED", "interrupted", **keep)
    elif type(exc).__name__ == "TrialPruned":  # a study stopped this run early: not a failure
        logger.set_tags({"optuna.pruned": "true"})
        logger.close("KILLED", f"pruned by the study at step {trainer.global_step}", **keep)
    else:
        logger.close("FAILED", str(exc) if isinstance(exc, Diverged) else f"{type(exc).__name__}: {exc}", **keep)


@rank_zero_only
def write_result(result: Result, path) -> None:
    """The outcome as JSON, for a parent process (a study trial that ran ``train.py`` for DDP); rank 0 only."""
    import json

    Path(path).write_text(json.dumps({"value": result.value, "run_id": result.run_id, "metrics": result.metrics,
                                      "epoch_seconds": result.epoch_seconds}))
