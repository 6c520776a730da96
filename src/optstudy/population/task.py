"""The Lightning module of a population: K members of one model stacked on dim 0, trained as one.

Nothing couples the members: the loss is the sum over members of each member's mean loss, so member k's gradient
is its standalone run's; gradient clipping is per member; each member sees its own data split and batch order (its
seed's, as ``optstudy.lit.EpochShuffle`` gives them), or with ``population.shared_order`` the first member's; a member
whose loss becomes NaN/inf or blows up (the standalone rule, ``divergence.factor``) is frozen at its last weights and
recorded as diverged while the others go on.

Stopped members (diverged, pruned by a study, or ended by early stopping) are frozen at once and, at the end of an
epoch where at least ``COMPACT_AT`` of the stack's rows are stopped, cut out of it (``Stacked.keep_members``, the
optimizer's ``keep_members``): they cost nothing from then on. Row ``r`` of the stack is member ``rows[r]``.

Metrics go to each member's own MLflow run (``PopulationLogger.log_member_metrics``), at the steps a standalone run
logs them: ``train_loss``, ``lr/g{i}`` and AdaBound's bounds every ``trainer.log_every_n_steps``; ``val_loss`` and
``val_acc`` every epoch.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.nn import functional as F

import optstudy.optim as optim
from optstudy import delay
from optstudy.config import optimizer_kwargs
from optstudy.lit import EpochShuffle, scheduler

COMPACT_AT = 0.25  # share of stopped rows that pays for a cut: copying every parameter and state tensor once


class Batches:
    """One epoch of stacked batches: ``(K, B, ...)`` inputs and ``(K, B)`` targets, member k's drawn from its own
    dataset in its own order. ``xs``/``ys`` hold one row per distinct dataset; ``source[k]`` is member k's row."""

    def __init__(self, xs, ys, source: list[int], seeds: list[int], batch_size: int, shuffle: bool,
                 epoch: Callable[[], int], orders: list | None = None):
        self.xs, self.ys, self.seeds, self.batch_size, self.shuffle, self.epoch = xs, ys, seeds, batch_size, shuffle, epoch
        self.orders = orders or [None] * len(seeds)  # each member's data.order (``_order.Order``; None: shuffle)
        self.source = torch.tensor(source, device=xs.device)[:, None]
        self.n = xs.shape[1]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _orders(self) -> torch.Tensor:
        orders = {}
        for seed, order in set(zip(self.seeds, self.orders)):  # the standalone run's sampler, per member
            sampler = EpochShuffle(self.n, seed, shuffle=self.shuffle, order=order)
            sampler.set_epoch(self.epoch())
            orders[seed, order] = torch.tensor(list(iter(sampler)))
        return torch.stack([orders[key] for key in zip(self.seeds, self.orders)]).to(self.xs.device)

    def keep(self, rows: list[int]) -> None:
        """Only these rows' members from the next epoch on (``PopulationTask._compact``)."""
        self.source = self.source[rows]
        self.seeds = [self.seeds[r] for r in rows]
        self.orders = [self.orders[r] for r in rows]

    def __iter__(self):
        orders = self._orders()
        for i in range(0, self.n, self.batch_size):
            idx = orders[:, i:i + self.batch_size]
            yield self.xs[self.source, idx], self.ys[self.source, idx]


class Steps:
    """An objective's epoch: ``ceil(n / batch_size)`` steps, as its standalone DataLoader makes."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        return iter(range(len(self)))


def stacked_data(datasets: list, member_seeds: list[int], split: str):
    """``(xs, ys, source)``: the distinct datasets' ``split`` (one per seed) as stacked tensors, and each member's
    row in them."""
    if datasets[0].task == "objective":
        return len(getattr(datasets[0], split))
    distinct = {}
    for seed, data in zip(member_seeds, datasets):
        distinct.setdefault(seed, getattr(data, split))
    xs, ys = zip(*(_tensors(ds) for ds in distinct.values()))
    row = {seed: i for i, seed in enumerate(distinct)}
    return torch.stack(xs), torch.stack(ys), [row[s] for s in member_seeds]


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.as_tensor(np.array([y for _, y in items]))


def member_kwargs(members: list[dict]) -> dict:
    """The optimizer's keywords for ``optim.build(..., members=K)``: a value shared by all members once, else the
    list of each member's (a bound schedule's parameters likewise)."""
    each = [optimizer_kwargs(m, notes=False) for m in members]
    out = {}
    for key in each[0]:
        values = [kw[key] for kw in each]
        if key == "bound" and isinstance(values[0], dict):
            out[key] = {p: _one_or_all([v[p] for v in values]) for p in values[0]}
        else:
            out[key] = _one_or_all(values)
    return out


def _one_or_all(values: list):
    return values[0] if all(v == values[0] for v in values) else list(values)


class PopulationTask(pl.LightningModule):
    """``model``: a ``Stacked`` module; ``members``: each member's resolved config (``members.member_dicts``);
    ``train``/``val``: ``stacked_data``."""

    def __init__(self, cfg: DictConfig, members: list[dict], model, task: str, train, val, orders: list | None = None):
        super().__init__()
        self.cfg, self.members, self.model, self.task = cfg, members, model, task
        self.k = len(members)
        self.rows = list(range(self.k))  # the member in each row of the stack (fewer once stopped ones are cut)
        self._row = {k: k for k in self.rows}
        self._loaders: list[Batches] = []  # to cut with the stack
        self.train_data, self.val_data = train, val
        self.orders = orders or [None] * self.k  # each member's data.order, as its standalone run's (run._stacked)
        seeds = [m["seed"] for m in members]
        self.order_seeds = [seeds[0]] * self.k if cfg.population.shared_order else seeds
        self.diverged: dict[int, str] = {}  # member -> reason
        self.stopped: dict[int, str] = {}  # member -> reason, for members a study pruned or early stopping ended
        self.early: set[int] = set()  # those of ``stopped`` that early stopping ended (finished, not pruned)
        self.first_loss: list[float | None] = [None] * self.k
        self.last: list[dict[str, float]] = [{} for _ in range(self.k)]  # each member's latest metrics
        self.on_stopped: Callable[[int, str, str], None] = lambda k, status, reason: None  # set by the runner
        self._weights: dict[int, list[torch.Tensor]] = {}  # a stopped member's weights when it stopped
        self._frozen: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (members, their weights per param)
        self._factor = cfg.get("divergence", {}).get("factor")  # read once: OmegaConf access costs ~0.1 ms
        self._val = torch.zeros(self.k, 3, dtype=torch.float64)
        self.compactions: list[tuple[int, int]] = []  # (epoch, rows left) per cut
        self.trajectories: list[list[dict]] = [[] for _ in range(self.k)]  # objectives: metrics() after each step
        self.delay_line = delay.population_line(members)  # trainer.delay: one delay sequence for all members

    # --- data -----------------------------------------------------------------------------------------------------
    def _batches(self, data, shuffle: bool):
        if self.task == "objective":  # the objectives ignore their batches: only their number matters
            return Steps(data, self.cfg.data.batch_size)
        xs, ys, source = data
        seeds = self.order_seeds if shuffle else [m["seed"] for m in self.members]
        batches = Batches(xs.to(self.device), ys.to(self.device), [source[k] for k in self.rows],
                          [seeds[k] for k in self.rows], self.cfg.data.batch_size, shuffle, lambda: self.current_epoch,
                          [self.orders[k] for k in self.rows] if shuffle else None)
        self._loaders.append(batches)
        return batches

    def train_dataloader(self):
        return self._batches(self.train_data, shuffle=True)

    def val_dataloader(self):
        return self._batches(self.val_data, shuffle=False)

    # --- steps ----------------------------------------------------------------------------------------------------
    def _losses(self, logits, y) -> torch.Tensor:
        """Each row's mean loss, shape (rows,)."""
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(len(self.rows), -1).mean(1)

    def training_step(self, batch, batch_idx):
        if self.task == "objective":
            losses = self.model()
        else:
            x, y = batch
            losses = self._losses(self.model(x), y)
        values = dict(zip(self.rows, losses.detach().double().cpu().tolist()))  # member -> loss
        for k, value in values.items():
            if k not in self.diverged and k not in self.stopped:
                self._check_divergence(k, value)
        alive = torch.tensor([k not in self.diverged and k not in self.stopped for k in self.rows],
                             device=losses.device)
        t = self.global_step + 1  # the update this batch makes, as a standalone run labels it
        if self.logger is not None and t % self.trainer.log_every_n_steps == 0:
            self.logger.log_member_metrics(
                {k: {"train_loss": values[k], **self._schedule_metrics(k, t)} for k in self.alive()}, t)
        for k in self.alive():
            self.last[k]["train_loss"] = values[k]
        return torch.where(alive, losses, torch.zeros_like(losses)).sum()

    def alive(self) -> list[int]:
        return [k for k in range(self.k) if k not in self.diverged and k not in self.stopped]

    def stop(self, k: int, reason: str) -> None:
        """Freezes member k for a study that pruned it: its run ends KILLED with ``reason``, as a pruned standalone
        run's does, and the others go on."""
        if k in self.alive():
            self.stopped[k] = reason
            self._freeze(k, "KILLED", reason)

    def stop_early(self, k: int) -> None:
        """Freezes member k, which early stopping ended (``optstudy.population.early``): frozen and cut as a pruned
        member is, its run ends FINISHED as a standalone run that stops early does."""
        if k in self.alive():
            self.stopped[k] = "early stopping"
            self.early.add(k)
            self._freeze(k, "FINISHED", None)

    def row(self, k: int) -> int:
        """Member k's row in the stack (while it is in it)."""
        return self._row[k]

    def _freeze(self, k: int, status: str, reason: str) -> None:
        self._weights[k] = [p[self._row[k]].detach().clone() for p in self.model.parameters()]
        members = sorted(self._weights)  # restored together after each step: one index_copy_ per parameter
        self._frozen = (torch.tensor([self._row[m] for m in members], device=self.device),
                        [torch.stack([self._weights[m][i] for m in members]) for i in range(len(self._weights[k]))])
        self.on_stopped(k, status, reason)
        if not self.alive():
            self.trainer.should_stop = True

    def _check_divergence(self, k: int, value: float) -> None:
        """The standalone rule (``Task._check_divergence``), per member: the member is frozen, not the run."""
        first = self.first_loss[k] = value if self.first_loss[k] is None else self.first_loss[k]
        factor = self._factor
        if math.isfinite(value) and not (factor and self.task != "objective" and first > 0 and value > factor * first):
            return  # checked for every member at every step: nothing else before this line
        where = f"at epoch {self.current_epoch}, step {self.global_step}"
        if not math.isfinite(value):
            reason = f"training diverged: the loss is {value} {where}"
        else:
            reason = (f"training diverged: the loss is {value:.4g}, over divergence.factor={factor:g} times its "
                      f"first value {first:.4g}, {where}")
        self.diverged[k] = reason
        self._freeze(k, "FAILED", reason)

    def _schedule_metrics(self, k: int, t: int) -> dict[str, float]:
        """Member k's lr and (AdaBound) bounds for update ``t``."""
        opt = self.optimizers().optimizer
        out = {}
        for i, group in enumerate(opt.param_groups):
            out[f"lr/g{i}"] = _pick(group["lr"], self._row[k])
            if hasattr(opt, "bounds"):
                lower, upper = opt.bounds(group, t)
                r = self._row[k]
                out[f"bound/g{i}/lower"], out[f"bound/g{i}/upper"] = _pick(lower, r), _pick(upper, r)
        return out

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.delay_line is None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            self._after_update()
            return
        # trainer.delay: the same delays for every member (optstudy.delay), so all rows step together
        self.delay_line.step(optimizer, optimizer_closure, self.global_step, after=self._after_update)
        t = self.global_step + 1
        if self.logger is not None and t % self.trainer.log_every_n_steps == 0:
            self.logger.log_member_metrics({k: self.delay_line.metrics() for k in self.alive()}, t)

    def on_train_end(self):
        if self.delay_line is not None and self.logger is not None:
            self.logger.log_member_metrics({k: self.delay_line.metrics(final=True) for k in self.alive()},
                                           self.global_step)

    def _after_update(self):
        if self.task == "objective":  # e.g. the counterexample's x in [-1, 1]
            with torch.no_grad():
                self.model.project_()
        if self._frozen is not None:  # stopped members keep the weights they had then: one copy per parameter
            index, saved = self._frozen
            with torch.no_grad():
                for p, value in zip(self.model.parameters(), saved):
                    p.index_copy_(0, index, value)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Per member: Lightning's clipping would take one norm over all members' gradients together."""
        if not gradient_clip_val:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            for g in grads:
                g.clamp_(-gradient_clip_val, gradient_clip_val)
            return
        norms = torch.stack([g.detach().pow(2).reshape(len(self.rows), -1).sum(1) for g in grads]).sum(0).sqrt()
        coef = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s, per member
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))

    # --- validation -----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self._val = torch.zeros(len(self.rows), 3, dtype=torch.float64, device=self.device)

    def on_train_start(self):
        if self.task == "objective" and self.global_step == 0:
            self._objective_metrics(0, log=True)  # the start of each trajectory

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.task == "objective":  # the iterate after the step (and its projection): the last is the result
            self._objective_metrics(self.global_step, log=self.global_step % self.trainer.log_every_n_steps == 0)

    def _objective_metrics(self, step: int, log: bool) -> None:
        alive = set(self.alive())
        rows = {k: m for k, m in zip(self.rows, self.model.metrics()) if k in alive}
        for k, metrics in rows.items():
            self.last[k].update(metrics)
            self.trajectories[k].append({"step": step, **metrics})
        if log and self.logger is not None:
            self.logger.log_member_metrics(rows, step)

    def validation_step(self, batch, batch_idx):
        if self.task == "objective":
            value = self.model.val_loss().double()
            self._val += torch.stack([value, torch.zeros_like(value), torch.ones_like(value)], 1)
            return
        x, y = batch
        logits = self.model(x)
        n = y[0].numel()
        losses = self._losses(logits, y)
        correct = ((logits.argmax(-1) == y).reshape(len(self.rows), -1).sum(1) if self.task == "classification"
                   else 0 * losses)
        self._val += torch.stack([losses.double() * n, correct.double(), torch.full_like(losses, n).double()], 1)

    def on_validation_epoch_end(self):
        loss_sum, correct, count = self._val.cpu().unbind(1)
        rows, alive = {}, set(self.alive())
        for r, k in enumerate(self.rows):
            metrics = {"val_loss": loss_sum[r].item() / max(count[r].item(), 1)}
            if self.task == "classification":
                metrics["val_acc"] = correct[r].item() / max(count[r].item(), 1)
            elif self.task == "language_model":
                metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 700))
            if k in alive:
                self.last[k].update(metrics)
                rows[k] = metrics
        if self.logger is not None and not self.trainer.sanity_checking and rows:
            self.logger.log_member_metrics(rows, self.global_step)

    def on_train_epoch_end(self):  # after this epoch's validation, where a study prunes
        gone = [r for r, k in enumerate(self.rows) if k in self.diverged or k in self.stopped]
        if gone and len(gone) < len(self.rows) and len(gone) >= COMPACT_AT * len(self.rows):
            if self.model.can_keep_members():  # else the stopped members stay frozen in the stack
                self._compact([r for r in range(len(self.rows)) if r not in set(gone)])

    def _compact(self, keep: list[int]) -> None:
        """Only rows ``keep`` from now on: the stack, the optimizer's state and hyperparameters, the lr schedule's
        and the data's rows. The kept members continue exactly as they would have."""
        self.model.keep_members(keep)
        opt = self.optimizers().optimizer
        opt.keep_members(keep, schedulers=[c.scheduler for c in self.trainer.lr_scheduler_configs])
        for batches in self._loaders:
            batches.keep(keep)
        self.rows = [self.rows[r] for r in keep]
        self._row = {k: r for r, k in enumerate(self.rows)}
        self._weights, self._frozen = {}, None  # every frozen member was cut
        if self.delay_line is not None:  # the gradients in flight too
            self.delay_line.keep_members(keep)
        self.compactions.append((self.current_epoch, len(self.rows)))

    def configure_optimizers(self):
        kwargs = member_kwargs(self.members)
        opt = optim.build(kwargs.pop("name"), self.model.parameters(), members=self.k, **kwargs)
        sched = scheduler(self.cfg.get("scheduler", {}), opt)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}


def _pick(value, k: int) -> float:
    return float(value[k]) if isinstance(value, np.ndarray) else float(value)
