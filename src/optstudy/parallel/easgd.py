"""Elastic Averaging SGD (Zhang, Choromanska & LeCun 2015, "Deep learning with Elastic Averaging SGD").

N workers, each with its own parameters x_i and any core optimizer (``cfg.optimizer``) stepping on its own shard
(``EpochShuffle`` rank i of N), and a centre variable x̃ (the run's result), all starting at the same θ_0. Every
``tau`` local steps (t = 0, τ, 2τ, ...; before that step's gradient, as in the paper's Algorithms 1 and 2) a worker
and the centre pull on each other with moving rate α = ``alpha`` (the paper's α = ηρ):

    d_i = α (x_i - x̃);   x_i ← x_i - d_i;   x̃ ← x̃ + d_i

- ``variant: sync`` (Algorithm 1, synchronous EASGD): all workers at once, every d_i from the same x̃:
  x̃ ← x̃ + α Σ_i (x_i - x̃). One all-reduce of the x_i (gloo on CPU, NCCL on GPUs) per communication; every rank
  keeps an identical copy of x̃, so no server is needed. Rank 0 logs.
- ``variant: async`` (Algorithm 2, asynchronous EASGD): a server process (rank 0, besides the N workers) holds x̃;
  a worker sends x_i, the server computes d_i from the x̃ it has then, applies it and sends d_i back (so each
  exchange is atomic on the server; point-to-point send/recv over gloo). Delay (``delay/*``): the centre updates by
  other workers since this worker's previous exchange, i.e. how much newer the x̃ it is pulled to is than the last
  one it saw.

α = 0 leaves every worker independent: each x_i equals a single-process run on its own shard (tests).

Curves: ``val_loss``/``val_acc`` of x̃ after each epoch of the workers together; ``train_loss`` the workers' mean
loss since their last communication, ``worker{i}/train_loss`` each one's (at its own step); ``lr/g*`` (at each
communication but the first) and effective learning rates (``eff_lr/g*/...``, ``eff_lr_histograms.npz``) of worker
0's optimizer, in both variants: the elastic step is not an optimizer's, the gradient updates are the workers' own
optimizers'. Sync: rank 0 reports everything. Async: the server reports x̃'s curves, the losses and ``delay/*``;
worker 0 reports its optimizer's curves to the parent itself (the server has no optimizer).

Step: gradients computed by all workers together. Worker 0's t-th update is at step N·t, the gradients computed
once every worker has made t updates. Sync: exactly when it happened (the workers step together). Async: where t
updates of one worker belong on the run's x-axis, not the count at the moment it made them (worker 0 does not know
the others' progress: the server's replies carry d_i only); the two agree while the workers keep pace, and at the
end always (every worker makes as many updates: the last record is at the step of the last ``val_loss``). Async's
``train_loss`` is at the count of gradients the workers have reported to the server by then. (Worker 0's own step t,
as ``worker0/train_loss`` uses, would squeeze its lr curves into the first 1/N of the run's axis.)

Checkpoint: x̃ (``state_dict``), every worker's x_i (``workers``) and worker 0's optimizer state at the end
(``optimizer_worker0``; async: sent to the server with its last x_i); no resume.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.distributed as dist

from optstudy.parallel import loop
from optstudy.parallel import messages as m
from optstudy.parallel.launch import launch


def run(cfg, built, out: Path, tmp: Path, on_report) -> None:
    n, sync = cfg.trainer.processes, cfg.trainer.variant == "sync"
    if sync:
        roles = lambda r: f"worker {r} (rank {r})"
    else:
        roles = lambda r: "the centre's server (rank 0)" if r == 0 else f"worker {r - 1} (rank {r})"
    launch(_process, n if sync else n + 1, (cfg, built, out), tmp / "errors", roles=roles, on_report=on_report)


def _process(rank: int, world: int, reports, cfg, built, out: Path) -> None:
    data, model = built
    sync = cfg.trainer.variant == "sync"
    index = rank if sync else max(rank - 1, 0)
    p = loop.problem(cfg, index, built=(data, copy.deepcopy(model)))  # its own copy of θ_0
    m.init(rank, world, "nccl" if sync and p.device.type == "cuda" else "gloo")
    try:
        if sync:
            _sync_worker(p, rank, world, loop.report(reports, rank, cfg) if rank == 0 else None, out)
        elif rank == 0:
            _server(p, world - 1, loop.report(reports, 0, cfg), out)
        else:
            _async_worker(p, rank - 1, world - 1, loop.report(reports, rank, cfg) if rank == 1 else None)
    finally:
        dist.destroy_process_group()


# --- synchronous EASGD ------------------------------------------------------------------------------------------
def _sync_worker(p: loop.Problem, rank: int, n: int, record: loop.Report | None, out: Path) -> None:
    """Worker ``rank`` of synchronous EASGD; ``record``: rank 0's reports to the parent (None elsewhere)."""
    cfg, alpha, tau = p.cfg, float(p.cfg.trainer.alpha), p.cfg.trainer.tau
    opt = loop.Optimizer(cfg, p.model.parameters(), rank)
    loader = loop.shard(p, rank, n)
    centre = loop.flat(p.model).clone()  # x̃, the same on every rank (same θ_0, same all-reduced sums)
    centre_model = copy.deepcopy(p.model)  # rank 0 validates x̃ in it
    numel = centre.numel()
    diverged = loop.Divergence(cfg, p.task, f"worker {rank}")
    losses, t = [], 0
    for epoch in range(cfg.trainer.max_epochs):
        for batch in loop.epoch_batches(p, loader, epoch):
            if t % tau == 0:
                x = loop.flat(p.model)
                # one all-reduce: [Σ_i x_i, each worker's mean loss since the last communication in its own slot]
                buf = torch.zeros(numel + n, dtype=p.dtype, device=p.device)
                buf[:numel] = x
                buf[numel + rank] = sum(losses) / len(losses) if losses else float("nan")
                dist.all_reduce(buf)
                loop.set_flat(p.model, x - alpha * (x - centre))
                centre += alpha * (buf[:numel] - n * centre)
                if record is not None and losses:
                    worker_losses = buf[numel:].tolist()
                    record.log({"train_loss": sum(worker_losses) / n, **{f"worker{i}/train_loss": v for i, v in
                                                                       enumerate(worker_losses)}, **loop.lrs(opt.opt)},
                               n * t)
                losses = []
            value = loop.gradient_step(p, opt.opt, batch)
            opt.step_schedule()
            losses.append(value)
            t += 1
            diverged.check(value, epoch, t)
            if record is not None:
                record.effective_lr(opt.opt, t, n * t)
        opt.end_epoch()
        if record is not None:
            loop.set_flat(centre_model, centre)
            record.epoch(epoch, n * t, loop.evaluate(p, centre_model))
    everyone = [torch.zeros_like(centre) for _ in range(n)]
    dist.all_gather(everyone, loop.flat(p.model))  # every worker's x_i, for the checkpoint
    if record is not None:
        record.effective_lr(opt.opt, t, n * t, force=True)
        loop.set_flat(centre_model, centre)
        _finish(p, record, centre_model, everyone, opt.opt.state_dict(), out, "easgd sync")


# --- asynchronous EASGD -----------------------------------------------------------------------------------------
def _server(p: loop.Problem, workers: int, record: loop.Report, out: Path) -> None:
    cfg, alpha = p.cfg, float(p.cfg.trainer.alpha)
    centre = loop.flat(p.model).cpu().clone()  # x̃, where gloo's messages arrive
    numel = centre.numel()
    epochs = m.EpochCounter(workers, loop.steps_per_epoch(p, loop.shard(p, 0, workers)), cfg.trainer.max_epochs)
    delays = loop.Delays()
    updates, seen = 0, {}  # centre updates; per worker: `updates` after its last exchange
    final, opt_state = [None] * workers, None
    for src, h in m.serve(workers, 0):
        if h.kind == m.EXCHANGE:
            x = m.receive(numel, p.dtype, src, m.TAG_PAYLOAD)
            d = alpha * (x - centre)
            centre += d
            m.send(d, src, m.TAG_REPLY)
            if src in seen:  # a worker's first exchange has no previous one to be late against
                delays.add(updates - seen[src])
            updates += 1
            seen[src] = updates
        elif h.kind == m.DONE:
            final[src - 1] = m.receive(numel, p.dtype, src, m.TAG_PAYLOAD)
            if src == 1 and cfg.checkpoint.enabled:  # worker 0's optimizer state, for the checkpoint
                received = [None]
                dist.recv_object_list(received, src=1)
                opt_state = received[0]
        if not math.isnan(h.loss):  # the header carries the worker's mean loss since its last message
            record.log({"train_loss": h.loss}, epochs.counted + h.counted)
            record.log({f"worker{src - 1}/train_loss": h.loss}, h.worker_step)
        for epoch in epochs.add(h.counted):
            loop.set_flat(p.model, centre)
            record.delays(delays, epochs.counted)
            record.epoch(epoch, epochs.counted, loop.evaluate(p))
    loop.set_flat(p.model, centre)
    _finish(p, record, p.model, final, opt_state, out, "easgd async")


def _async_worker(p: loop.Problem, index: int, workers: int, record: loop.Report | None) -> None:
    """Worker ``index`` of asynchronous EASGD; ``record``: worker 0's reports to the parent (None elsewhere), its
    optimizer's ``lr/g*`` and effective lrs, its t-th update at run step ``workers * t`` (module docstring)."""
    cfg, tau = p.cfg, p.cfg.trainer.tau
    opt = loop.Optimizer(cfg, p.model.parameters(), index)
    loader = loop.shard(p, index, workers)
    numel = sum(q.numel() for q in p.model.parameters())
    diverged = loop.Divergence(cfg, p.task, f"worker {index}")
    losses, t, counted = [], 0, 0

    def message(kind: int) -> None:
        nonlocal losses, counted
        mean = sum(losses) / len(losses) if losses else float("nan")
        m.send_header(m.header(kind, 0, loss=mean, worker_step=t, counted=counted))
        losses, counted = [], 0

    for epoch in range(cfg.trainer.max_epochs):
        for batch in loop.epoch_batches(p, loader, epoch):
            if t % tau == 0:  # x_i ← x_i - α (x_i - x̃), x̃ ← x̃ + α (x_i - x̃) on the server
                if record is not None and t:  # at each communication after the first, as sync EASGD
                    record.log(loop.lrs(opt.opt), workers * t)
                message(m.EXCHANGE)
                x = loop.flat(p.model)
                m.send(x, 0, m.TAG_PAYLOAD)
                loop.set_flat(p.model, x - m.receive(numel, p.dtype, 0, m.TAG_REPLY).to(x.device))
            value = loop.gradient_step(p, opt.opt, batch)
            opt.step_schedule()
            losses.append(value)
            t += 1
            counted += 1
            diverged.check(value, epoch, t)
            if record is not None:
                record.effective_lr(opt.opt, t, workers * t)
        opt.end_epoch()
        message(m.PROGRESS)  # the server counts its epochs by the gradients workers report
    if record is not None:
        record.effective_lr(opt.opt, t, workers * t, force=True)
    message(m.DONE)
    m.send(loop.flat(p.model), 0, m.TAG_PAYLOAD)  # x_i at the end, for the checkpoint
    if index == 0 and cfg.checkpoint.enabled:  # and worker 0's optimizer state (the sync checkpoint has it too)
        dist.send_object_list([_to_cpu(opt.opt.state_dict())], dst=0)


# --- the end ----------------------------------------------------------------------------------------------------
def _to_cpu(state):
    """A state dict with every tensor on the CPU, as the checkpoint's weights are: pickled as they are, worker 0's
    CUDA tensors would be unpickled onto its GPU in the server's process."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


def _finish(p, record, centre_model, workers: list, opt_state: dict | None, out: Path, trainer: str) -> None:
    if not p.cfg.checkpoint.enabled:
        return
    shapes = copy.deepcopy(centre_model)
    worker_states = []
    for x in workers:
        loop.set_flat(shapes, x)
        worker_states.append(loop.state_dict_like_lightning(shapes))
    record.checkpoint(out, {"state_dict": loop.state_dict_like_lightning(centre_model), "workers": worker_states,
                            "optimizer_worker0": opt_state,
                            "optstudy": {"trainer": trainer}})
