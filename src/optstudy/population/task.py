"""The Lightning module of a population: K members of one model stacked on dim 0, trained as one.

Nothing couples the members: the loss is the sum over members of each member's mean loss, so member k's gradient
is its standalone run's; gradient clipping is per member; each member sees its own data split and batch order (its
seed's, as ``optstudy.lit.EpochShuffle`` gives them), or with ``population.shared_order`` the first member's; a member
whose loss becomes NaN/inf or blows up (the standalone rule, ``divergence.factor``) is frozen at its last weights and
recorded as diverged while the others go on.

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
from optstudy.config import optimizer_kwargs
from optstudy.lit import EpochShuffle, scheduler


class Batches:
    """One epoch of stacked batches: ``(K, B, ...)`` inputs and ``(K, B)`` targets, member k's drawn from its own
    dataset in its own order. ``xs``/``ys`` hold one row per distinct dataset; ``source[k]`` is member k's row."""

    def __init__(self, xs, ys, source: list[int], seeds: list[int], batch_size: int, shuffle: bool,
                 epoch: Callable[[], int]):
        self.xs, self.ys, self.seeds, self.batch_size, self.shuffle, self.epoch = xs, ys, seeds, batch_size, shuffle, epoch
        self.source = torch.tensor(source, device=xs.device)[:, None]
        self.n = xs.shape[1]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _orders(self) -> torch.Tensor:
        orders = {}
        for seed in set(self.seeds):
            sampler = EpochShuffle(self.n, seed, shuffle=self.shuffle)
            sampler.set_epoch(self.epoch())
            orders[seed] = torch.tensor(list(iter(sampler)))
        return torch.stack([orders[s] for s in self.seeds]).to(self.xs.device)

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

    def __init__(self, cfg: DictConfig, members: list[dict], model, task: str, train, val):
        super().__init__()
        self.cfg, self.members, self.model, self.task = cfg, members, model, task
        self.k = len(members)
        self.train_data, self.val_data = train, val
        seeds = [m["seed"] for m in members]
        self.order_seeds = [seeds[0]] * self.k if cfg.population.shared_order else seeds
        self.diverged: dict[int, str] = {}  # member -> reason
        self.stopped: dict[int, str] = {}  # member -> reason, for members a study pruned
        self.first_loss: list[float | None] = [None] * self.k
        self.last: list[dict[str, float]] = [{} for _ in range(self.k)]  # each member's latest metrics
        self.on_stopped: Callable[[int, str, str], None] = lambda k, status, reason: None  # set by the runner
        self._weights: dict[int, list[torch.Tensor]] = {}  # a stopped member's weights when it stopped
        self._frozen: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (members, their weights per param)
        self._factor = cfg.get("divergence", {}).get("factor")  # read once: OmegaConf access costs ~0.1 ms
        self._val = torch.zeros(self.k, 3, dtype=torch.float64)
        self.trajectories: list[list[dict]] = [[] for _ in range(self.k)]  # objectives: metrics() after each step

    # --- data -----------------------------------------------------------------------------------------------------
    def _batches(self, data, shuffle: bool):
        if self.task == "objective":  # the objectives ignore their batches: only their number matters
            return Steps(data, self.cfg.data.batch_size)
        xs, ys, source = data
        seeds = self.order_seeds if shuffle else [m["seed"] for m in self.members]
        return Batches(xs.to(self.device), ys.to(self.device), source, seeds, self.cfg.data.batch_size, shuffle,
                       lambda: self.current_epoch)

    def train_dataloader(self):
        return self._batches(self.train_data, shuffle=True)

    def val_dataloader(self):
        return self._batches(self.val_data, shuffle=False)

    # --- steps ----------------------------------------------------------------------------------------------------
    def _losses(self, logits, y) -> torch.Tensor:
        """Each member's mean loss, shape (K,)."""
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(self.k, -1).mean(1)

    def training_step(self, batch, batch_idx):
        if self.task == "objective":
            losses = self.model()
        else:
            x, y = batch
            losses = self._losses(self.model(x), y)
        values = losses.detach().double().cpu().tolist()
        for k, value in enumerate(values):
            if k not in self.diverged and k not in self.stopped:
                self._check_divergence(k, value)
        alive = torch.tensor([k not in self.diverged and k not in self.stopped for k in range(self.k)],
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

    def _freeze(self, k: int, status: str, reason: str) -> None:
        self._weights[k] = [p[k].detach().clone() for p in self.model.parameters()]
        members = sorted(self._weights)  # restored together after each step: one index_copy_ per parameter
        self._frozen = (torch.tensor(members, device=self.device),
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
            out[f"lr/g{i}"] = _pick(group["lr"], k)
            if hasattr(opt, "bounds"):
                lower, upper = opt.bounds(group, t)
                out[f"bound/g{i}/lower"], out[f"bound/g{i}/upper"] = _pick(lower, k), _pick(upper, k)
        return out

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
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
        norms = torch.stack([g.detach().pow(2).reshape(self.k, -1).sum(1) for g in grads]).sum(0).sqrt()
        coef = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s, per member
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))

    # --- validation -----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self._val = torch.zeros(self.k, 3, dtype=torch.float64, device=self.device)

    def on_train_start(self):
        if self.task == "objective" and self.global_step == 0:
            self._objective_metrics(0, log=True)  # the start of each trajectory

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.task == "objective":  # the iterate after the step (and its projection): the last is the result
            self._objective_metrics(self.global_step, log=self.global_step % self.trainer.log_every_n_steps == 0)

    def _objective_metrics(self, step: int, log: bool) -> None:
        rows = {k: m for k, m in enumerate(self.model.metrics()) if k in self.alive()}
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
        correct = (logits.argmax(-1) == y).reshape(self.k, -1).sum(1) if self.task == "classification" else 0 * losses
        self._val += torch.stack([losses.double() * n, correct.double(), torch.full_like(losses, n).double()], 1)

    def on_validation_epoch_end(self):
        loss_sum, correct, count = self._val.cpu().unbind(1)
        rows = {}
        for k in range(self.k):
            metrics = {"val_loss": loss_sum[k].item() / max(count[k].item(), 1)}
            if self.task == "classification":
                metrics["val_acc"] = correct[k].item() / max(count[k].item(), 1)
            elif self.task == "language_model":
                metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 700))
            if k in self.alive():
                self.last[k].update(metrics)
                rows[k] = metrics
        if self.logger is not None and not self.trainer.sanity_checking and rows:
            self.logger.log_member_metrics(rows, self.global_step)

    def configure_optimizers(self):
        kwargs = member_kwargs(self.members)
        opt = optim.build(kwargs.pop("name"), self.model.parameters(), members=self.k, **kwargs)
        sched = scheduler(self.cfg.get("scheduler", {}), opt)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}


def _pick(value, k: int) -> float:
    return float(value[k]) if isinstance(value, np.ndarray) else float(value)
