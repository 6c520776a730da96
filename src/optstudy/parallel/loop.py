"""What every process of a parallel run does the same way: the seeded problem, its shard of the batches, a loss, a
validation, the core optimizer with its scheduler, and the reports to the parent, which keeps the run's record.

A plain torch loop, not Lightning's: Hogwild!, Downpour and EASGD decide themselves when parameters are read,
written and exchanged, which Lightning's strategies (all synchronous) cannot express. Everything a run of
``train.py`` has is kept: the same initial weights (seeded as ``optstudy.lit.Task`` is built), the same batches
(``EpochShuffle``'s order: a pure function of seed and epoch, shard r of N taking every N-th index), the same loss,
metrics and effective-lr records, MLflow from one process (the parent's). The processes import neither Lightning nor
MLflow: on this 2-core machine under load, importing Lightning took 28 s per process.

Steps. Every curve of the run's own variable (the shared, server or centre parameters) is logged at step = the
minibatch gradients computed by all workers together, so one x-axis (examples / batch size) serves a single process,
DDP's N gradients per step and every parallel strategy. Per-worker curves (``worker{i}/train_loss``) use that
worker's own step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler

from optstudy import data as datasets
from optstudy import models, optim
from optstudy.config import optimizer_kwargs
from optstudy.errors import OptstudyError
from optstudy.optim import _noise

SMALL_MODEL = 1_000_000  # parameters: optstudy.train.SMALL_MODEL


class Diverged(OptstudyError):
    """A process's loss became NaN/inf or blew up; the parent raises it as ``optstudy.lit.Diverged`` (exit 3)."""

    exit_code = 3


# --- the problem ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Problem:
    """One process's copy of the problem: data, model (on its device, in its dtype) and how to feed it."""

    cfg: object
    data: datasets.Data
    model: torch.nn.Module
    dtype: torch.dtype
    device: torch.device

    @property
    def task(self) -> str:
        return self.data.task


def seeded(cfg) -> tuple[datasets.Data, torch.nn.Module]:
    """The data and the initial model exactly as ``train.py`` makes them: seed everything, load, build."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = datasets.load(cfg.data, cfg.seed)
    return data, models.build(cfg.model, data)


def dtype_of(cfg) -> torch.dtype:
    return torch.float64 if str(cfg.trainer.precision).startswith("64") else torch.float32


def device_of(cfg, local_index: int) -> torch.device:
    """``trainer.accelerator=gpu``: GPU ``local_index`` modulo the GPUs there are; else the CPU."""
    if cfg.trainer.accelerator == "gpu":
        return torch.device("cuda", local_index % torch.cuda.device_count())
    return torch.device("cpu")


def problem(cfg, local_index: int, built=None) -> Problem:
    """This process's problem; ``built``: a (data, model) pair made already (Hogwild's shared model)."""
    data, model = built or seeded(cfg)
    dtype, device = dtype_of(cfg), device_of(cfg, local_index)
    set_threads(cfg, model)
    if model.parameters().__next__().dtype != dtype or device.type != "cpu":
        model.to(device=device, dtype=dtype)  # a shared model is already in its dtype (moving would un-share it)
    return Problem(cfg, data, model, dtype, device)


def set_threads(cfg, model) -> None:
    """``optstudy.train.set_threads``' rule (which imports Lightning): ``trainer.threads``, else one thread for
    models under 1M parameters; the processes are the parallelism, and two threads per process on a busy CPU make
    OpenMP's barriers wait on each other."""
    import os

    threads = cfg.trainer.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    elif "OMP_NUM_THREADS" not in os.environ and sum(q.numel() for q in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)


# --- batches ----------------------------------------------------------------------------------------------------
class Shard(Sampler):
    """``optstudy.lit.EpochShuffle``'s training order without importing Lightning (seconds per process): epoch e's
    permutation of n depends only on (seed, e), padded by wrapping to a multiple of ``shards``; shard r takes every
    ``shards``-th index from r. Equal to ``EpochShuffle(n, seed, r, shards)`` (tests/test_parallel.py)."""

    def __init__(self, n: int, seed: int, index: int, shards: int):
        self.n, self.seed, self.index, self.shards, self.epoch = n, seed, index, shards, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        size = -(-self.n // self.shards) * self.shards
        return iter(torch.randperm(self.n, generator=gen).repeat(2)[:size][self.index::self.shards].tolist())

    def __len__(self) -> int:
        return (self.n + self.shards - 1) // self.shards


def shard(p: Problem, index: int, shards: int) -> DataLoader:
    """Shard ``index`` of ``shards`` of the training set: every ``shards``-th example of each epoch's permutation."""
    sampler = Shard(len(p.data.train), p.cfg.seed, index, shards)
    return DataLoader(p.data.train, batch_size=p.cfg.data.batch_size, sampler=sampler)


def steps_per_epoch(p: Problem, loader: DataLoader) -> int:
    limit = p.cfg.trainer.get("limit_train_batches")
    return len(loader) if limit is None else min(len(loader), int(limit))


def epoch_batches(p: Problem, loader: DataLoader, epoch: int):
    loader.sampler.set_epoch(epoch)
    return itertools.islice(loader, steps_per_epoch(p, loader))


def _moved(p: Problem, t: torch.Tensor) -> torch.Tensor:
    t = t.to(p.device)
    return t.to(p.dtype) if t.is_floating_point() else t


def loss_of(p: Problem, batch) -> torch.Tensor:
    """The training loss of one batch, as ``optstudy.lit.Task`` computes it."""
    if p.task == "objective":
        return p.model(_moved(p, batch))
    x, y = (_moved(p, t) for t in batch)
    logits = p.model(x)
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())  # language models: per token


def gradient_step(p: Problem, opt, batch) -> float:
    """One step of the local optimizer on ``batch``: zero, loss, backward, step, project. Returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = loss_of(p, batch)
    loss.backward()
    opt.step()
    project(p.model)
    return loss.item()


def project(model) -> None:
    if hasattr(model, "project_"):  # e.g. the counterexample's x in [-1, 1]
        with torch.no_grad():
            model.project_()


@torch.no_grad()
def evaluate(p: Problem, model=None) -> dict[str, float]:
    """``val_loss`` and ``val_acc`` (classification) / ``val_ppl`` (language models) over the whole validation set,
    summed in float64 as ``Task.validation_step`` does; an objective model's ``val_loss`` and ``metrics()``."""
    model = model or p.model
    if p.task == "objective":
        return {"val_loss": float(model.val_loss()), **model.metrics()}
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in DataLoader(p.data.val, batch_size=p.cfg.data.batch_size):
        x, y = _moved(p, x), _moved(p, y)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.flatten(0, -2), y.flatten()).double()) * y.numel()
        correct += int((logits.argmax(-1) == y).sum()) if p.task == "classification" else 0
        count += y.numel()
    out = {"val_loss": loss_sum / max(count, 1)}
    if p.task == "classification":
        out["val_acc"] = correct / max(count, 1)
    elif p.task == "language_model":
        out["val_ppl"] = math.exp(min(out["val_loss"], 700))
    return out


def metric_names(data, model) -> tuple[str, ...]:
    """The choices of ``objective``, as ``Task.metric_names``."""
    extra = {"classification": ("val_acc",), "language_model": ("val_ppl",)}.get(data.task, ())
    if data.task == "objective":
        extra = tuple(model.metrics())
    return ("train_loss", "val_loss", *extra)


# --- the optimizer ----------------------------------------------------------------------------------------------
class Optimizer:
    """The core optimizer ``cfg.optimizer`` over ``params`` with ``cfg.scheduler``, stepped per update ("step"
    schedules) or per epoch ("epoch" schedules) by whoever applies updates; ``rank``: the process's, whose gradient
    noise (``optimizer.grad_noise``) is its own stream."""

    def __init__(self, cfg, params, rank: int = 0):
        kwargs = optimizer_kwargs(cfg, notes=False)
        noise = kwargs.get("grad_noise")
        if rank and isinstance(noise, dict) and noise.get("seed") is not None:
            kwargs["grad_noise"] = {**noise, "seed": _noise.worker_seed(noise["seed"], rank)}
        self.opt = optim.build(kwargs.pop("name"), params, **kwargs)
        sched = None
        if (cfg.get("scheduler") or {}).get("name", "constant") != "constant":
            from optstudy.lit import scheduler  # Lightning's import: only when a schedule is asked for

            sched = scheduler(cfg.scheduler, self.opt)
        self.sched, self.interval = (sched["scheduler"], sched["interval"]) if sched else (None, None)

    def step(self) -> None:
        self.opt.step()
        self.step_schedule()

    def step_schedule(self) -> None:
        """After an update: a per-step schedule moves on (``inv_sqrt``)."""
        if self.interval == "step":
            self.sched.step()

    def end_epoch(self) -> None:
        if self.interval == "epoch":
            self.sched.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def lrs(opt) -> dict[str, float]:
    """``lr/g{i}``: the learning rate of each param group (the schedule's current value)."""
    return {f"lr/g{i}": float(group["lr"]) for i, group in enumerate(opt.param_groups)}


class Divergence:
    """``Task._check_divergence``'s rule: NaN/inf, or (classification, language models) above
    ``divergence.factor`` times the first loss this process saw."""

    def __init__(self, cfg, task: str, who: str):
        self.factor = (cfg.get("divergence") or {}).get("factor")
        self.task, self.who, self.first = task, who, None
        self.what = f"optimizer {cfg.optimizer.name}, lr {cfg.optimizer.lr}"

    def check(self, value: float, epoch: int, step: int) -> None:
        self.first = value if self.first is None else self.first
        where = f"at epoch {epoch}, step {step} of {self.who} ({self.what})"
        if not math.isfinite(value):
            raise Diverged(f"training diverged: the loss is {value} {where}")
        if self.factor and self.task != "objective" and self.first > 0 and value > self.factor * self.first:
            raise Diverged(f"training diverged: the loss is {value:.4g}, over divergence.factor={self.factor:g} "
                           f"times its first value {self.first:.4g}, {where}")


# --- flat parameter vectors (what processes exchange) -------------------------------------------------------------
def flat(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def set_flat(model, vector: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(vector.to(next(model.parameters()).device), model.parameters())


def flat_grad(model) -> torch.Tensor:
    """The gradients as one dense vector (a sparse gradient densified: messages carry dense tensors)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad
             for p in model.parameters()]
    return torch.cat([g.reshape(-1) for g in grads])


def set_flat_grad(model, vector: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.grad = vector[offset:offset + n].view_as(p).to(p.device).clone()
        offset += n


# --- staleness --------------------------------------------------------------------------------------------------
class Delays:
    """The delays (staleness: updates applied between the read of the parameters a gradient was computed at and its
    own application) of the updates seen so far, as counts per delay; the metrics ``delay/*`` use the names of the
    single-process simulator (``optstudy.delay``)."""

    def __init__(self):
        self.counts = np.zeros(16, dtype=np.int64)

    def add(self, delay: int, n: int = 1) -> None:
        delay = max(int(delay), 0)
        if delay >= len(self.counts):
            self.counts = np.pad(self.counts, (0, max(delay + 1, 2 * len(self.counts)) - len(self.counts)))
        self.counts[delay] += n

    def merge(self, counts) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        for delay in np.nonzero(counts)[0]:
            self.add(int(delay), int(counts[delay]))

    def metrics(self) -> dict[str, float]:
        n = int(self.counts.sum())
        if n == 0:
            return {}
        values = np.arange(len(self.counts))
        cum = np.cumsum(self.counts)
        pct = {f"delay/p{q}": float(values[np.searchsorted(cum, q / 100 * n)]) for q in (50, 90, 99)}
        return {"delay/mean": float((values * self.counts).sum() / n), "delay/max": float(values[cum >= n][0]),
                **pct, "delay/applied": float(n)}


# --- what the processes tell the parent -----------------------------------------------------------------------
def report(queue, rank: int, cfg) -> Report:
    every = int(cfg.logger.get("eff_lr_every_n_steps", 25)) if cfg.logger.name == "mlflow" else 0
    return Report(queue, rank, every)


class Report:
    """A process's reports to the parent, which keeps the run's record (``optstudy.parallel.record``): MLflow,
    the epoch lines, artifacts. Small tuples on a ``torch.multiprocessing`` queue; effective-lr histograms (a few
    small tensors) as pickled bytes. The processes themselves import neither MLflow nor
    Lightning (seconds each per process)."""

    def __init__(self, queue, rank: int, eff_lr_every: int):
        self.queue, self.rank, self.every = queue, rank, eff_lr_every
        self._epoch_start = time.perf_counter()
        self._last_eff_lr = None

    def restart_clock(self) -> None:
        """The first epoch's time starts now (after set-up and the processes' rendezvous)."""
        self._epoch_start = time.perf_counter()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.queue.put(("log", {k: float(v) for k, v in metrics.items()}, int(step)))

    def delays(self, delays: Delays, step: int) -> None:
        """This process's delay counts so far; the parent logs ``delay/*`` over every process's."""
        self.queue.put(("delays", self.rank, delays.counts.tolist(), int(step)))

    def effective_lr(self, opt, own_step: int, step: int, force: bool = False) -> None:
        """The histogram of log10 effective lr of ``opt`` (after its ``own_step``-th update) at run step ``step``,
        every ``logger.eff_lr_every_n_steps`` of its updates, after its first and (``force``) its last."""
        if not self.every or own_step == 0 or not (force or own_step == 1 or own_step % self.every == 0):
            return
        if self._last_eff_lr == step:
            return
        self._last_eff_lr = step
        hist = optim.lr_histogram(opt, 160, -10.0, 6.0)  # lrlog.EffectiveLR's bins
        bounds = [[float(b) for b in opt.bounds(g, own_step)] for g in opt.param_groups] \
            if hasattr(opt, "bounds") else None
        # by value (plain pickle), not as torch's shared-memory handles, which die with a process that has ended
        self.queue.put(("eff_lr", int(step), pickle.dumps(hist), bounds))

    def epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """The end of the run's epoch ``epoch`` (from 0) at ``step``, with its validation metrics."""
        seconds = time.perf_counter() - self._epoch_start
        self._epoch_start = time.perf_counter()
        self.queue.put(("epoch", epoch, int(step), {k: float(v) for k, v in metrics.items()}, seconds))

    def checkpoint(self, out: Path, checkpoint: dict) -> None:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, out / "checkpoints" / "last.ckpt")


def state_dict_like_lightning(model) -> dict:
    """The model's weights under the keys a Lightning checkpoint of ``optstudy.lit.Task`` has (``model.<name>``)."""
    return {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
