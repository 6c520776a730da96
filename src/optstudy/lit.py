"""The Lightning module: one model, one optimizer of the core, three kinds of task (``optstudy.data.TASKS``).

Metrics it logs, at step s = the number of optimizer steps taken when the value was measured:

- every ``trainer.log_every_n_steps``: ``train_loss`` (the batch loss at θ_s), ``lr/g{i}`` and AdaBound's
  ``bound/g{i}/lower|upper`` (those of the update θ_s -> θ_{s+1}), an objective model's ``metrics()`` (e.g. the
  iterate x = θ_s, from s = 0);
- every epoch: ``val_loss`` and ``val_acc`` (classification) or ``val_ppl`` (language models), averaged over all
  validation examples of all ranks.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler

import optstudy.optim as optim
from optstudy import delay, models
from optstudy.config import optimizer_kwargs
from optstudy.data import _order
from optstudy.errors import ConfigError, OptstudyError


class Diverged(OptstudyError):
    """The training loss became NaN or infinite, or blew up (see ``Task._check_divergence``)."""

    exit_code = 3


SCHEDULERS = ("constant", "inv_sqrt", "multistep")


def scheduler(cfg, opt):
    """``constant``; ``inv_sqrt``: lr α/√t per step t = 1, 2, ... (the AMSGrad paper's online setting);
    ``multistep``: lr × gamma at each epoch of ``milestones`` (AdaBound's CIFAR schedule: 0.1 at 150)."""
    name = cfg.get("name", "constant")
    if name == "inv_sqrt":
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / math.sqrt(s + 1)),
                "interval": "step"}
    if name == "multistep":
        return {"scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma),
                "interval": "epoch"}
    if name != "constant":
        raise ConfigError(f"scheduler.name must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return None


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch), so a run resumed from a checkpoint sees the same batches
    as one that never stopped; with several ranks, rank r takes every world-th index (padded by wrapping so that
    every rank steps equally often). ``order``: another ``data.order``'s n indices per epoch instead
    (``optstudy.data._order``: fixed, curriculum, mixed, anti_curriculum; also a function of (seed, epoch) only)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, order=None):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.order = order  # data.order other than shuffle: an optstudy.data._order.Order, else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def _size(self) -> int:
        # training shards are padded to equal length: DDP all-reduces gradients once per step on every rank
        return -(-self.n // self.world) * self.world if self.shuffle else self.n

    def __iter__(self):
        if self.shuffle and self.order is not None:
            order = self.order.indices(self.n, self.seed, self.epoch).repeat(2)[: self._size()]
        elif self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen).repeat(2)[: self._size()]
        else:
            order = torch.arange(self.n)
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self._size(), self.world))


class EpochTimer(pl.Callback):
    """Seconds per epoch, training and validation together (``seconds``); with ``print_lines``, one line per epoch
    (rank 0) where there is no progress bar, so that logs of cluster jobs and CI stay readable."""

    def __init__(self, print_lines: bool = False):
        self.print_lines = print_lines
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        self.seconds.append(time.perf_counter() - self._start)
        if not (self.print_lines and trainer.is_global_zero):
            return
        shown = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                          if "/" not in k)
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  step {trainer.global_step}  {shown}  "
              f"({self.seconds[-1]:.1f}s)", flush=True)


class Trajectory(pl.Callback):
    """An objective model's ``metrics()`` (e.g. the iterate x, y) at the start and after every step, saved as
    ``trajectory.csv`` and drawn as ``trajectory.png``: on the contour plot for 2-D surfaces, else over the steps."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_start(self, trainer, module):
        if not self.rows:
            self.rows.append({"step": trainer.global_step, **module.model.metrics()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({"step": trainer.global_step, **module.model.metrics()})

    def save(self, directory, model, label: str) -> list:
        if len(self.rows) < 2:
            return []
        import csv

        from optstudy.plots import iterate_plot, trajectory_plot

        table = directory / "trajectory.csv"
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        if not hasattr(model, "surface"):  # 1-D or many dimensions: the metrics over the steps
            return [table, iterate_plot(self.rows, label, directory / "trajectory.png")]
        path = [(r["x"], r["y"]) for r in self.rows]
        return [table, trajectory_plot(model, {label: path}, directory / "trajectory.png")]


class Task(pl.LightningModule):
    def __init__(self, cfg: DictConfig, data):
        super().__init__()
        self.cfg, self.data = cfg, data
        self.model = models.build(cfg.model, data)
        self.task = data.task
        self.order = _order.build(cfg.data, data)  # data.order: None for shuffle; scores computed before training
        self._val = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        self.tracking: dict = {}  # the MLflow run, saved in checkpoints so that a resumed run continues it
        self.delay_line = delay.line(cfg)  # trainer.delay: gradients applied late (None: no delay)

    def metric_names(self) -> tuple[str, ...]:
        """The metrics this task logs: the choices of ``objective``."""
        extra = {"classification": ("val_acc",), "language_model": ("val_ppl",)}.get(self.task, ())
        if self.task == "objective":
            extra = tuple(self.model.metrics())
        return ("train_loss", "val_loss", *extra)

    # --- data -----------------------------------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
        sampler = EpochShuffle(len(dataset), self.cfg.seed, rank, world, shuffle, self.order if shuffle else None)
        return DataLoader(dataset, batch_size=self.cfg.data.batch_size, sampler=sampler,
                          num_workers=self.cfg.data.get("num_workers", 0))

    def train_dataloader(self):
        if self.data.datamodule is not None:  # the user's LightningDataModule: its batch size, collate and order
            return self.data.datamodule.train_dataloader()
        return self._loader(self.data.train, shuffle=True)

    def val_dataloader(self):
        if self.data.datamodule is not None:
            return self.data.datamodule.val_dataloader()
        return self._loader(self.data.val, shuffle=False)

    # --- steps ----------------------------------------------------------------------------------------------------
    def _logits_loss(self, batch):
        x, y = batch
        logits = self.model(x)
        # language models: (batch, bptt, vocab) logits against (batch, bptt) targets, averaged per token
        return logits, y, F.cross_entropy(logits.flatten(0, -2), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self.model(batch) if self.task == "objective" else self._logits_loss(batch)[2]
        value = loss.item()
        self._check_divergence(value)
        self.log("train_loss", loss, prog_bar=True, logger=False)  # the progress bar and callbacks
        t = self.global_step + 1  # the update this batch makes: every curve's step is its t (see the README)
        if self.logger is not None and t % self.trainer.log_every_n_steps == 0:
            # directly, at full precision (Lightning's self.log rounds to float32) and at t, not Lightning's t - 1
            self.logger.log_metrics({"train_loss": value, **self._schedule_metrics(t)}, t)
        return loss

    def _check_divergence(self, value: float) -> None:
        """Diverged: the loss is NaN/inf or, for classification and language models (losses >= 0 that start near
        ln(classes)), above ``divergence.factor`` times its first value in this process. A synthetic objective's
        loss may start at 0 or go negative by design (regret, escaping a saddle): only NaN/inf there."""
        first = self.__dict__.setdefault("_first_loss", value)
        factor = self.cfg.get("divergence", {}).get("factor")
        where = (f"at epoch {self.current_epoch}, step {self.global_step} (optimizer {self.cfg.optimizer.name}, "
                 f"lr {self.cfg.optimizer.lr})")
        if not math.isfinite(value):
            raise Diverged(f"training diverged: the loss is {value} {where}")
        if factor and self.task != "objective" and first > 0 and value > factor * first:
            raise Diverged(f"training diverged: the loss is {value:.4g}, over divergence.factor={factor:g} times "
                           f"its first value {first:.4g}, {where}")

    def on_train_start(self):
        if self.task == "objective" and self.logger is not None and self.global_step == 0:
            self.logger.log_metrics(self.model.metrics(), 0)  # the start of the trajectory

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.task != "objective":
            return
        # the iterate after the step (and its projection): the last one is the run's result
        metrics = self.model.metrics()
        self.log_dict(metrics, logger=False)
        if self.logger is not None and self.global_step % self.trainer.log_every_n_steps == 0:
            self.logger.log_metrics(metrics, self.global_step)

    def _schedule_metrics(self, t: int) -> dict[str, float]:
        """The lr and (AdaBound) bounds that update ``t`` uses."""
        opt = self.optimizers().optimizer
        out = {}
        for i, group in enumerate(opt.param_groups):
            out[f"lr/g{i}"] = float(group["lr"])
            if hasattr(opt, "bounds"):
                out[f"bound/g{i}/lower"], out[f"bound/g{i}/upper"] = map(float, opt.bounds(group, t))
        return out

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.delay_line is None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            self._project()
            return
        self.delay_line.step(optimizer, optimizer_closure, self.global_step, after=self._project)
        t = self.global_step + 1  # this step's label, as train_loss's
        if self.logger is not None and t % self.trainer.log_every_n_steps == 0:
            self.logger.log_metrics(self.delay_line.metrics(), t)

    def _project(self):
        if hasattr(self.model, "project_"):  # e.g. the counterexample's x in [-1, 1]
            with torch.no_grad():
                self.model.project_()

    def on_validation_epoch_start(self):
        self._val = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        if self.task == "objective":
            self._val += torch.stack([self.model.val_loss().double(), self._val.new_zeros(()), self._val.new_ones(())])
            return
        logits, y, loss = self._logits_loss(batch)
        correct = (logits.argmax(-1) == y).sum() if self.task == "classification" else 0
        self._val += torch.stack([loss.double() * y.numel(), torch.as_tensor(correct, dtype=torch.float64,
                                                                             device=self.device),
                                  torch.tensor(float(y.numel()), dtype=torch.float64, device=self.device)])

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum") if self.trainer.world_size > 1 else self._val
        loss_sum, correct, count = total.tolist()
        metrics = {"val_loss": loss_sum / max(count, 1)}
        if self.task == "classification":
            metrics["val_acc"] = correct / max(count, 1)
        elif self.task == "language_model":
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 700))
        self.log_dict(metrics, prog_bar=True, logger=False)
        # Lightning would label these with the last training batch's index (one less than the steps taken); the
        # curves' step is the number of optimizer steps taken when the value was measured, as for train_loss
        if self.logger is not None and not self.trainer.sanity_checking:
            self.logger.log_metrics(metrics, self.global_step)

    def on_train_end(self):
        if self.delay_line is not None and self.logger is not None:
            self.logger.log_metrics(self.delay_line.metrics(final=True), self.global_step)
        # DDP keeps the replicas equal by averaging gradients; check it at the end instead of trusting it: the
        # largest difference of any parameter between ranks, logged by rank 0 (0.0 when they agree)
        if self.trainer.world_size > 1:
            flat = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
            spread = (self.all_gather(flat) - flat).abs().max().item()
            if self.logger is not None:
                self.logger.log_metrics({"ddp/param_max_diff": spread}, self.global_step)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["optstudy"] = dict(self.tracking)
        if self.delay_line is not None:  # the gradients in flight: a resumed run applies them as this one would
            checkpoint["optstudy_delay"] = self.delay_line.state_dict()

    def on_load_checkpoint(self, checkpoint):
        # Lightning restores the weights into the module before its precision plugin converts the module: converted
        # first, a 64-true run's weights load without a detour through float32 (the later conversion is then a no-op)
        if self._trainer is not None:
            self.trainer.precision_plugin.convert_module(self)
        saved = checkpoint.get("optstudy_delay")
        if (saved is None) != (self.delay_line is None):
            raise ConfigError(f"trainer.delay must be the checkpoint's ({saved['spec'] if saved else 0}) to resume it "
                              f"exactly, got {self.delay_line.spec.label() if self.delay_line else 0}")
        if saved is not None:
            self.delay_line.load_state_dict(saved)

    def configure_optimizers(self):
        kwargs = optimizer_kwargs(self.cfg)
        opt = optim.build(kwargs.pop("name"), self.model.parameters(), **kwargs)
        sched = scheduler(self.cfg.get("scheduler", {}), opt)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
