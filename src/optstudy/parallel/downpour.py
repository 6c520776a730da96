"""Downpour SGD (Dean et al. 2012, "Large Scale Distributed Deep Networks", Sec. 4.1): asynchronous data-parallel
SGD with a parameter server.

Processes: a parameter server (rank 0, one process besides the ``trainer.processes`` workers) holds the parameters
θ and the core optimizer (``cfg.optimizer``, any of ``optstudy.optim``); worker w (rank w + 1) loops over its shard
(``EpochShuffle`` rank w of N) with a local copy θ_w that only pulls change:

- every ``pull_every`` of its steps (Dean et al.'s n_fetch) it pulls θ from the server (with θ's version v, the
  number of updates the server has applied);
- each step it computes the gradient of its batch at θ_w and adds it to an accumulator Δ_w;
- every ``push_every`` steps (n_push), and at the end of each epoch, it pushes the mean of Δ_w over its k gradients
  (one push = one optimizer step on a k x batch_size batch, so the core optimizer's step sizes keep their meaning
  whatever push_every is) and resets Δ_w.

The server applies every push as it arrives: ``θ ← optimizer step(θ, mean Δ)``; it never waits for a slow worker,
so gradients are stale: a gradient computed at version v and applied as update u + 1 has delay u - v (``delay/*``,
from the versions the push carries, one per gradient). With one worker and push_every = pull_every = 1 this is
sequential SGD with the core optimizer (delay 0): a plain run.

Messages: ``optstudy.parallel.messages`` over torch.distributed (gloo) send/recv. The run's curves (the server logs
them): ``val_loss``/``val_acc`` of θ after each epoch of the workers together, ``train_loss`` (each push's mean loss),
the server optimizer's ``lr/g*`` and effective learning rates, ``worker{w}/train_loss`` at worker steps, ``delay/*``.
Step: gradients computed by all workers together. Checkpoint: θ and the server optimizer's state at the end; no
resume (workers' accumulators and versions are in flight at any moment).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

from optstudy.parallel import loop
from optstudy.parallel import messages as m
from optstudy.parallel.launch import launch


def run(cfg, built, out: Path, tmp: Path, on_report) -> None:
    world = cfg.trainer.processes + 1
    launch(_process, world, (cfg, built, out), tmp / "errors", on_report=on_report,
           roles=lambda r: "the parameter server (rank 0)" if r == 0 else f"worker {r - 1} (rank {r})")


def _process(rank: int, world: int, reports, cfg, built, out: Path) -> None:
    data, model = built
    p = loop.problem(cfg, max(rank - 1, 0), built=(data, copy.deepcopy(model)))  # its own copy of θ_0
    m.init(rank, world)
    try:
        if rank == 0:
            _server(p, world - 1, loop.report(reports, 0, cfg), out)
        else:
            _worker(p, rank - 1, world - 1)
    finally:
        dist.destroy_process_group()


def _server(p: loop.Problem, workers: int, report: loop.Report, out: Path) -> None:
    cfg = p.cfg
    opt = loop.Optimizer(cfg, p.model.parameters())
    numel = sum(q.numel() for q in p.model.parameters())
    extra, every = cfg.trainer.push_every, cfg.trainer.log_every_n_steps
    epochs = m.EpochCounter(workers, loop.steps_per_epoch(p, loop.shard(p, 0, workers)), cfg.trainer.max_epochs)
    delays, diverged = loop.Delays(), loop.Divergence(cfg, p.task, "the parameter server")
    version = 0  # updates applied
    for src, h in m.serve(workers, extra):
        if h.kind == m.PULL:
            m.send(torch.tensor([float(version)], dtype=torch.float64), src, m.TAG_VERSION)
            m.send(loop.flat(p.model), src, m.TAG_REPLY)
        elif h.kind == m.PUSH:
            loop.set_flat_grad(p.model, m.receive(numel, p.dtype, src, m.TAG_PAYLOAD))
            opt.step()
            loop.project(p.model)
            for v in h.versions:
                delays.add(version - v)  # updates applied since the parameters this gradient saw
            version += 1
            diverged.check(h.loss, epochs.epoch, version)
            step = epochs.counted + h.counted
            report.log({f"worker{src - 1}/train_loss": h.loss}, h.worker_step)
            if version % every == 0:
                report.log({"train_loss": h.loss, **loop.lrs(opt.opt)}, step)
                report.delays(delays, step)
            report.effective_lr(opt.opt, version, step)
        for epoch in epochs.add(h.counted):
            opt.end_epoch()
            report.delays(delays, epochs.counted)
            report.epoch(epoch, epochs.counted, loop.evaluate(p))
    report.effective_lr(opt.opt, version, epochs.counted, force=True)
    if cfg.checkpoint.enabled:
        report.checkpoint(out, {"state_dict": loop.state_dict_like_lightning(p.model), "optimizer": opt.opt.state_dict(),
                                "optstudy": {"trainer": "downpour", "updates": version}})


def _worker(p: loop.Problem, index: int, workers: int) -> None:
    cfg = p.cfg
    push_every, pull_every = cfg.trainer.push_every, cfg.trainer.pull_every
    loader = loop.shard(p, index, workers)
    numel = sum(q.numel() for q in p.model.parameters())
    diverged = loop.Divergence(cfg, p.task, f"worker {index}")
    acc = torch.zeros(numel, dtype=p.dtype, device=p.device)  # Δ_w: the gradients since the last push
    versions, losses, step, version = [], [], 0, 0

    def push():
        h = m.header(m.PUSH, push_every, len(versions), sum(losses) / len(losses), step, len(versions), versions)
        m.send_header(h)
        m.send(acc / len(versions), 0, m.TAG_PAYLOAD)
        acc.zero_()
        versions.clear()
        losses.clear()

    for epoch in range(cfg.trainer.max_epochs):
        for batch in loop.epoch_batches(p, loader, epoch):
            if step % pull_every == 0:
                version = _pull(p, numel, push_every)
            p.model.zero_grad(set_to_none=True)
            loss = loop.loss_of(p, batch)
            loss.backward()
            acc += loop.flat_grad(p.model)
            versions.append(version)
            losses.append(loss.item())
            step += 1
            diverged.check(losses[-1], epoch, step)
            if len(versions) == push_every:
                push()
        if versions:  # the epoch's last gradients: the server counts its epochs by them
            push()
    m.send_header(m.header(m.DONE, push_every, worker_step=step))


def _pull(p: loop.Problem, numel: int, extra: int) -> int:
    """θ_w ← the server's θ; returns θ's version."""
    m.send_header(m.header(m.PULL, extra))
    version = int(m.receive(1, torch.float64, 0, m.TAG_VERSION)[0])
    loop.set_flat(p.model, m.receive(numel, p.dtype, 0, m.TAG_REPLY))
    return version
