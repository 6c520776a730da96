"""Parallel and distributed SGD from Ruder's overview (Sec. 5): ``trainer=hogwild``, ``trainer=downpour``,
``trainer=easgd``, each ``trainer.processes`` processes (default 2) on existing engines:

- ``hogwild`` (``optstudy.parallel.hogwild``): lock-free updates of one model in shared memory
  (``torch.multiprocessing``), Niu et al. 2011;
- ``downpour`` (``optstudy.parallel.downpour``): asynchronous workers pushing accumulated gradients every
  ``push_every`` steps to a parameter server that applies the core optimizer, and pulling its parameters every
  ``pull_every`` steps (``torch.distributed`` point-to-point, gloo), Dean et al. 2012;
- ``easgd`` (``optstudy.parallel.easgd``): Elastic Averaging SGD, workers with any core optimizer tied to a centre
  variable by an elastic force of moving rate ``alpha`` every ``tau`` steps, ``variant: sync`` (all-reduce; gloo on
  CPU, NCCL on GPUs) or ``async`` (a centre on a server process), Zhang, Choromanska & LeCun 2015.

``train(cfg)`` starts the processes the way torchrun does (``launch``: spawned, ``MASTER_ADDR``/``MASTER_PORT`` on
a free port), waits for them and returns ``optstudy.train.Result`` like a Lightning run, so ``train.py`` and
studies run them unchanged. MLflow is written by the parent only: the processes report their curves to it on a
``torch.multiprocessing`` queue (``parallel.record``), and it marks the run FAILED/KILLED, with the curves up to
there, when the processes fail or are interrupted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from optstudy.errors import ConfigError, OptstudyError

NAMES = ("hogwild", "downpour", "easgd")
PRECISIONS = ("32-true", "32", 32, "64-true", "64", 64)

__all__ = ["NAMES", "active", "check", "train"]


class Interrupted(OptstudyError):
    """Ctrl-C during a parallel run; its processes were stopped."""

    exit_code = 130


def active(cfg) -> bool:
    """Whether ``cfg.trainer`` is one of the parallel trainers (``trainer.name``)."""
    return OmegaConf.select(cfg, "trainer.name", default=None) in NAMES


def _int(cfg, key: str, low: int) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def check(cfg: DictConfig) -> None:
    """Every value of a parallel trainer's config, and what it cannot do, as ``ConfigError``s naming the key, the
    rule and the value; before anything is loaded (``optstudy.config.validate`` calls it). Nothing for others."""
    if not active(cfg):
        return
    name, t = cfg.trainer.name, cfg.trainer
    _int(cfg, "trainer.processes", 1)
    _int(cfg, "trainer.log_every_n_steps", 1)
    if t.get("limit_train_batches") is not None:
        _int(cfg, "trainer.limit_train_batches", 1)
    if t.accelerator not in ("cpu", "gpu"):
        raise ConfigError(f"trainer.accelerator must be cpu or gpu with trainer={name}, got {t.accelerator!r}")
    if t.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator=gpu (trainer={name}): no CUDA GPU on this machine")
        gpus = torch.cuda.device_count()
        if name == "easgd" and t.get("variant") == "sync" and t.processes > gpus:
            raise ConfigError(f"trainer.processes must be at most the {gpus} GPU(s) here with trainer=easgd "
                              f"trainer.variant=sync trainer.accelerator=gpu (NCCL takes one GPU per worker), got "
                              f"{t.processes}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be 32-true or 64-true with trainer={name}, got {t.precision!r}")
    if name == "downpour":
        _int(cfg, "trainer.push_every", 1)
        _int(cfg, "trainer.pull_every", 1)
    if name == "easgd":
        _int(cfg, "trainer.tau", 1)
        alpha = t.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"trainer.alpha (EASGD's moving rate) must be a number in [0, 1], got {alpha!r}")
        if t.variant not in ("sync", "async"):
            raise ConfigError(f"trainer.variant must be sync or async, got {t.variant!r}")
    _refuse_unsupported(cfg, name)


def _refuse_unsupported(cfg, name: str) -> None:
    from optstudy.population import members

    if cfg.get("ckpt_path"):
        raise ConfigError(f"ckpt_path: trainer={name} cannot resume from a checkpoint: its processes run "
                          f"asynchronously and never stop together at one consistent state (its last.ckpt holds the "
                          f"final weights, for use as a model); got ckpt_path={cfg.ckpt_path}")
    if members.active(cfg):
        raise ConfigError(f"population: trainer={name} trains one model in several processes; populations "
                          f"(population.* values) are for trainer=cpu or gpu")
    order = OmegaConf.select(cfg, "data.order", default="shuffle")
    if order not in (None, "shuffle"):
        raise ConfigError(f"data.order must be shuffle with trainer={name} (each process shuffles its own shard), "
                          f"got {order!r}")


def _modules():
    from optstudy.parallel import downpour, easgd, hogwild

    return {"hogwild": hogwild, "downpour": downpour, "easgd": easgd}


def describe(cfg) -> str:
    """One line saying what runs: ``downpour: 2 workers + 1 parameter server, push_every=1, pull_every=1``."""
    t, n = cfg.trainer, cfg.trainer.processes
    if t.name == "hogwild":
        return f"hogwild: {n} process(es) updating one model in shared memory, without locks"
    if t.name == "downpour":
        return (f"downpour: {n} worker(s) + 1 parameter server (applies {cfg.optimizer.name}), "
                f"push_every={t.push_every}, pull_every={t.pull_every}")
    server = " + 1 centre server" if t.variant == "async" else " (all-reduce)"
    return f"easgd {t.variant}: {n} worker(s){server}, alpha={t.alpha:g}, tau={t.tau}, local {cfg.optimizer.name}"


def train(cfg: DictConfig, callbacks: list | None = None):
    """Trains ``cfg`` with its parallel trainer; returns ``optstudy.train.Result`` (the objective's final value of
    the run's own variable: shared, server or centre parameters). ``callbacks`` (a study's pruning) are not called:
    the epochs run in other processes, as with DDP trials."""
    from optstudy.config import validate
    from optstudy.parallel import loop
    from optstudy.parallel.record import Record
    from optstudy.train import Result, _resolved, make_logger, output_dir, summary_line

    validate(cfg)
    plain = OmegaConf.create(_resolved(cfg))  # without Hydra's node, whose interpolations need a Hydra app
    built = loop.seeded(plain)
    names = loop.metric_names(*built)
    if cfg.objective not in names:
        raise ConfigError(f"objective must be one of {', '.join(names)}, got {cfg.objective!r}")
    if built[0].datamodule is not None:
        raise ConfigError(f"data: trainer={cfg.trainer.name} shards datasets itself; a LightningDataModule's loaders "
                          f"cannot be split between processes (give (train, val) datasets instead)")
    logger = make_logger(cfg, None)
    if logger is not None:
        logger.log_hyperparams(_resolved(cfg))
    out = output_dir(cfg)
    record = Record(cfg, logger, out)
    print(describe(plain), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="optstudy-parallel-") as tmp:
        (Path(tmp) / "errors").mkdir()
        try:
            _modules()[cfg.trainer.name].run(plain, built, out, Path(tmp), record.handle)
        except BaseException as exc:
            _failed(logger, exc)
            if isinstance(exc, KeyboardInterrupt):  # every process is stopped by now (launch): one line, exit 130
                raise Interrupted("interrupted: every process of the run was stopped"
                                  + (f"; MLflow run {logger.run_id} is marked KILLED" if logger else "")) from None
            raise
    record.finish()
    metrics = dict(record.last)
    value = metrics[cfg.objective]
    print(summary_line(cfg, logger, start, value), flush=True)
    return Result(value, metrics, logger and logger.run_id, logger and logger.uri, out, record.epoch_seconds)


def _failed(logger, exc: BaseException) -> None:
    """The MLflow run of processes that failed or were stopped: KILLED (Ctrl-C) or FAILED with the one-line reason
    (rank 0 could not close it: it was stopped or died)."""
    if logger is None:
        return
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        logger.close("KILLED", "interrupted")
    else:
        logger.close("FAILED", str(exc) or type(exc).__name__)
