"""One training run from a composed config: data, model, an optimizer of the core; returns the objective.

A plain PyTorch loop for now; the Lightning module, MLflow tracking and effective-LR logging come with issue 3.
"""

from __future__ import annotations

import math
import time

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

import optstudy.optim as optim
from optstudy import data, models
from optstudy.errors import ConfigError, OptstudyError


class Diverged(OptstudyError):
    """The training loss became NaN or infinite."""


def optimizer_kwargs(cfg: DictConfig) -> dict:
    """The optimizer's keywords from ``cfg.optimizer`` (and ``cfg.bound`` for the bounded ones)."""
    hp = OmegaConf.to_container(cfg.optimizer, resolve=True)
    name = hp.pop("name")
    if "betas" in hp and isinstance(hp["betas"], list):
        hp["betas"] = tuple(hp["betas"])
    if "bound" in optim.defaults(name) and "bound" in cfg:
        hp.setdefault("bound", OmegaConf.to_container(cfg.bound, resolve=True))
    return {"name": name, **hp}


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


METRICS = ("train_loss", "val_loss", "val_acc")


def run(cfg: DictConfig) -> float:
    # checked before any work, so a typo does not cost a whole training run
    if cfg.objective not in METRICS:
        raise ConfigError(f"objective must be one of {', '.join(METRICS)}, got {cfg.objective!r}")
    batch = cfg.data.batch_size
    if not (isinstance(batch, int) and batch > 0):
        raise ConfigError(f"data.batch_size must be an integer > 0, got {batch!r}")
    torch.manual_seed(cfg.seed)
    d = data.load(cfg.data, cfg.seed)
    (x_tr, y_tr), (x_val, y_val) = d.train.tensors, d.val.tensors
    model = models.build(cfg.model, d)
    kwargs = optimizer_kwargs(cfg)
    opt = optim.build(kwargs.pop("name"), model.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, start = 0, time.perf_counter()
    metrics = {}
    for epoch in range(cfg.trainer.max_epochs):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(batch):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            if not math.isfinite(loss.item()):
                raise Diverged(f"training diverged: loss is {loss.item()} at epoch {epoch}, step {step} "
                               f"(optimizer {cfg.optimizer.name}, lr {cfg.optimizer.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        val_loss, val_acc = evaluate(model, x_val, y_val)
        metrics = dict(zip(METRICS, (loss.item(), val_loss, val_acc)))
        print(f"epoch {epoch + 1:3d}/{cfg.trainer.max_epochs}  step {step:5d}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    print(f"done in {time.perf_counter() - start:.1f}s: {cfg.objective} = {metrics[cfg.objective]:.4f}")
    return metrics[cfg.objective]
