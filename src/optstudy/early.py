"""Early stopping (``trainer.early_stopping``): Lightning's own ``EarlyStopping`` (``optstudy.early_callback``),
plus what it ended with; a population's members stop one by one (``optstudy.population.early``).

    python train.py trainer.early_stopping.patience=3                      # on: stop after 3 epochs without progress
    python train.py trainer.early_stopping.patience=3 trainer.early_stopping.monitor=val_acc   # mode: max, inferred

Off while ``patience`` is null (the default), so one override turns it on and a study can search it; ``monitor``
null is the run's ``objective``, ``mode`` null is ``max`` for ``val_acc`` and ``min`` for everything else. The rule
is Lightning's, checked once per epoch after validation: the monitored value improves when it beats the best so far
by more than ``min_delta`` (``current < best - min_delta`` for ``min``); after ``patience`` epochs in a row without
an improvement, training stops at the end of that epoch. The weights are the last epoch's (no best checkpoint is
restored), so the run's objective is the **last** epoch's value as without early stopping, which is up to
``patience`` epochs past the best; the best is recorded beside it.

Recorded in the MLflow run when training ends (epochs counted from 1, as the ``epoch e/N`` lines count them), and
in the ``metrics`` of ``train()``'s ``Result`` and of a population's members:

- ``early_stopping/epochs_run``: epochs trained (``trainer.max_epochs`` when it ran to the end);
- ``early_stopping/stopped``: 1.0 if early stopping ended the run, else 0.0 (and the tag ``early_stopping.stopped``);
- ``early_stopping/stopped_epoch``: the epoch it stopped after; only when it stopped (absent: it ran to the end);
- ``early_stopping/best_value``, ``early_stopping/best_epoch``: the best monitored value (as Lightning compares it:
  float32) and the epoch of it.

A study trial keeps them per seed in its user attr ``early_stopping`` (``record_trial``).
"""

from __future__ import annotations

import numbers

from omegaconf import DictConfig, OmegaConf

from optstudy.errors import ConfigError

KEY = "trainer.early_stopping"
MODES = ("min", "max")
PREFIX = "early_stopping/"
HIGHER_IS_BETTER = ("val_acc",)  # every other metric optstudy logs is a loss, a perplexity or an objective's value


def settings(cfg: DictConfig) -> dict | None:
    """``{"monitor", "mode", "patience", "min_delta"}`` with the defaults filled in, or None when it is off.
    Raises ``ConfigError`` naming the key, the rule and the value for a bad one (the monitor's name is checked
    against the task's metrics by ``check_monitor``, once the task is built)."""
    node = OmegaConf.select(cfg, KEY)
    if node is None or node.get("patience") is None:
        return None
    patience, min_delta = node.get("patience"), node.get("min_delta", 0.0)
    monitor, mode = node.get("monitor") or cfg.objective, node.get("mode")
    if not (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1):
        raise ConfigError(f"{KEY}.patience must be an integer >= 1 (null: early stopping off), got {patience!r}")
    if not (isinstance(min_delta, numbers.Real) and not isinstance(min_delta, bool) and min_delta >= 0):
        raise ConfigError(f"{KEY}.min_delta must be a number >= 0, got {min_delta!r}")
    if not isinstance(monitor, str):
        raise ConfigError(f"{KEY}.monitor must be a metric's name (null: the objective), got {monitor!r}")
    if mode is None:
        mode = "max" if monitor in HIGHER_IS_BETTER else "min"
    if mode not in MODES:
        raise ConfigError(f"{KEY}.mode must be min or max (null: max for val_acc, else min), got {mode!r}")
    return {"monitor": monitor, "mode": mode, "patience": patience, "min_delta": float(min_delta)}


def check_monitor(cfg: DictConfig, names) -> None:
    """The monitored metric is one the task logs (``Task.metric_names``), as the objective must be."""
    chosen = settings(cfg)
    if chosen is not None and chosen["monitor"] not in names:
        raise ConfigError(f"{KEY}.monitor must be one of {', '.join(names)}, got {chosen['monitor']!r}")


def callbacks(cfg: DictConfig) -> list:
    """``[EarlyStopping(...)]`` (``optstudy.early_callback``) when ``trainer.early_stopping`` is on, else ``[]``."""
    chosen = settings(cfg)
    if chosen is None:
        return []
    from optstudy.early_callback import EarlyStopping  # Lightning: not imported to check a config

    return [EarlyStopping(**chosen)]


def outcome(trainer) -> dict[str, float]:
    """The ``early_stopping/*`` metrics of the trainer's ``EarlyStopping``; ``{}`` without one."""
    from optstudy.early_callback import EarlyStopping

    found = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    return found[0].summary() if found else {}


def summary(epochs_run: int, stopped: bool, best_value: float, best_epoch: int) -> dict[str, float]:
    """The metrics early stopping records for a run or a population member."""
    out = {PREFIX + "epochs_run": float(epochs_run), PREFIX + "stopped": float(stopped),
           PREFIX + "best_value": best_value, PREFIX + "best_epoch": float(best_epoch)}
    if stopped:
        out[PREFIX + "stopped_epoch"] = float(epochs_run)
    return out


def record_trial(trial, metrics: dict, max_epochs: int) -> None:
    """Appends one run's (one seed's) early-stopping outcome to the trial's user attr ``early_stopping``:
    ``{"max_epochs": N, "epochs_run": [...], "stopped": [...], "best_value": [...], "best_epoch": [...]}``, one
    entry per seed in the study's seed order. Nothing when the run had early stopping off."""
    if PREFIX + "epochs_run" not in metrics:
        return
    attr = trial.user_attrs.get("early_stopping") or {"max_epochs": int(max_epochs), "epochs_run": [], "stopped": [],
                                                      "best_value": [], "best_epoch": []}
    attr["epochs_run"].append(int(metrics[PREFIX + "epochs_run"]))
    attr["stopped"].append(bool(metrics[PREFIX + "stopped"]))
    attr["best_value"].append(float(metrics[PREFIX + "best_value"]))
    attr["best_epoch"].append(int(metrics[PREFIX + "best_epoch"]))
    trial.set_user_attr("early_stopping", attr)
