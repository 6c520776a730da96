"""Hogwild! (Niu, Recht, Ré & Wright 2011): ``trainer.processes`` processes on one machine update one model in shared
memory without locks, each on its own shard of the data.

The model's tensors live in shared memory (``torch.multiprocessing``: ``share_memory_()``), handed to every process
at its start; each process loops over its shard (``EpochShuffle`` rank r of N) and applies its own updates to the
shared tensors in place, reading and writing them while the others do the same: no lock, no copy, no message. An
update may thus be computed at parameters that other processes have changed since (staleness), and two writes to
one element may interleave; Niu et al. show SGD still converges when updates are sparse, since they then rarely
touch the same elements.

Per-parameter optimizer state is **per process**: each process builds its own core optimizer over the shared
parameters, so Adam's moments, Adagrad's sums and every step count ``t`` are private. Why: (1) each process's
optimizer then follows its update rule exactly for its own stream of gradients (its ``t`` counts its own steps, so
bias corrections and schedules stay right), whereas shared state would be read-modified-written by several processes
at once, racing on every element, not only the sparse coordinates a step touches; (2) Hogwild's analysis is for
stateless SGD, and per-process state is what PyTorch's own Hogwild example does (an optimizer per process). Cost:
N copies of the state (memory), and each process's adaptive scale sees only 1/N of the gradients.

Staleness. A shared counter (``multiprocessing.Value``, the only lock, held for one increment) numbers the
updates. A process reads it just before its forward pass and increments it right after its optimizer step; the
difference is the number of updates other processes applied in between: the update's delay (``delay/*``).

The run's curves (the parent logs them): ``val_loss``/``val_acc`` of the shared parameters after each of rank 0's epochs
and after every process has finished (the final value), rank 0's ``train_loss`` and effective learning rates, every
process's ``worker{r}/train_loss`` and ``delay/*`` over all processes (each reports its own to the parent). Step: updates applied by all processes together. Checkpoint: the shared parameters and rank 0's
optimizer state at the end; no resume (the processes never stop together at one consistent state).

With one process this is a plain run: the same initial weights, batches, loss and optimizer as ``train.py`` (equal
at float64, tests/test_parallel.py).
"""

from __future__ import annotations

from pathlib import Path

import torch.multiprocessing as mp

from optstudy.parallel import loop
from optstudy.parallel.launch import launch


def run(cfg, built, out: Path, tmp: Path, on_report) -> None:
    """Shares the model, starts the processes, waits for them (``launch``)."""
    data, model = built
    model.to(dtype=loop.dtype_of(cfg))
    if cfg.trainer.accelerator == "gpu":
        model.to(loop.device_of(cfg, 0))  # CUDA tensors are shared between processes through CUDA IPC
    model.share_memory()
    ctx = mp.get_context("spawn")
    n = cfg.trainer.processes
    shared = {"version": ctx.Value("q", 0),  # updates applied to the shared parameters by all processes
              "started": ctx.Barrier(n),  # everyone set up: no process trains alone while others still import
              "finished": ctx.Barrier(n)}  # everyone done: the shared parameters are final
    launch(_process, cfg.trainer.processes, (cfg, data, model, shared, out), tmp / "errors",
           roles=lambda r: f"hogwild process {r}", on_report=on_report)


def _process(rank: int, world: int, reports, cfg, data, model, shared, out: Path) -> None:
    p = loop.problem(cfg, 0, built=(data, model))  # the shared model, as it is (moving it would un-share it)
    opt = loop.Optimizer(cfg, p.model.parameters(), rank)  # this process's own state (module docstring: why)
    loader = loop.shard(p, rank, world)
    version, report = shared["version"], loop.report(reports, rank, cfg)
    delays = loop.Delays()
    diverged = loop.Divergence(cfg, p.task, f"hogwild process {rank}")
    every, epochs, step = cfg.trainer.log_every_n_steps, cfg.trainer.max_epochs, 0
    shared["started"].wait()  # as torch.distributed's rendezvous does for the other trainers
    report.restart_clock()
    for epoch in range(epochs):
        for batch in loop.epoch_batches(p, loader, epoch):
            read = version.value  # the parameters this gradient sees are (at least) this fresh
            value = loop.gradient_step(p, opt.opt, batch)
            with version.get_lock():
                applied = version.value  # updates before this one; those after `read` are other processes'
                version.value += 1
            opt.step_schedule()
            delays.add(applied - read)
            step += 1
            diverged.check(value, epoch, step)
            if step % every == 0:
                report.log({f"worker{rank}/train_loss": value}, step)
                report.delays(delays, applied + 1)
                if rank == 0:
                    report.log({"train_loss": value, **loop.lrs(opt.opt)}, applied + 1)
            if rank == 0:
                report.effective_lr(opt.opt, step, applied + 1)
        opt.end_epoch()
        if rank == 0 and epoch < epochs - 1:  # the last epoch's validation waits for every process
            report.epoch(epoch, version.value, loop.evaluate(p))
    report.delays(delays, version.value)
    shared["finished"].wait()
    if rank != 0:
        return
    report.effective_lr(opt.opt, step, version.value, force=True)
    report.delays(delays, version.value)
    if epochs:
        report.epoch(epochs - 1, version.value, loop.evaluate(p))
    if cfg.checkpoint.enabled:
        report.checkpoint(out, {"state_dict": loop.state_dict_like_lightning(p.model),
                                "optimizer_rank0": opt.opt.state_dict(),
                                "optstudy": {"trainer": "hogwild", "updates": version.value}})
