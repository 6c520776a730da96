"""Lightning's ``EarlyStopping`` that also keeps what it ended with (``optstudy.early`` describes the records).

A module of its own so that checking a config (``optstudy.early.settings``) does not import Lightning (~3-9 s).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

from optstudy.early import PREFIX, summary

__all__ = ["EarlyStopping"]


class EarlyStopping(pl.callbacks.EarlyStopping):
    """Lightning's ``EarlyStopping`` (its rule unchanged), which also keeps the epoch of the best value, prints one
    line when it stops and logs the ``early_stopping/*`` metrics to the run's logger when training ends."""

    def __init__(self, monitor: str, mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        super().__init__(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta)
        self.best_epoch = 0  # 1-based; 0: no value seen yet
        self.epochs_run = 0
        self.stopped = False

    def _run_early_stopping_check(self, trainer) -> None:
        before = self.best_score.clone()
        super()._run_early_stopping_check(trainer)
        self.epochs_run = trainer.current_epoch + 1
        if not torch.equal(before, self.best_score.to(before.device)):
            self.best_epoch = self.epochs_run
        # Lightning's stopped_epoch is 0 both for "stopped after the first epoch" and "did not stop": keep a flag
        self.stopped = self.stopping_reason != EarlyStoppingReason.NOT_STOPPED

    def summary(self) -> dict[str, float]:
        """The ``early_stopping/*`` metrics (see the module's docstring)."""
        return summary(self.epochs_run, self.stopped, float(self.best_score), self.best_epoch)

    def on_train_end(self, trainer, module):
        values = self.summary()
        if trainer.is_global_zero and self.stopped:
            print(f"early stopping: {self.monitor} did not improve by more than {abs(self.min_delta):g} for "
                  f"{self.patience} epoch(s); stopped after epoch {self.epochs_run}/{trainer.max_epochs} (best "
                  f"{values[PREFIX + 'best_value']:.6g} at epoch {self.best_epoch})", flush=True)
        for logger in trainer.loggers:
            logger.log_metrics(values, trainer.global_step)
            if hasattr(logger, "set_tags"):  # optstudy's MLflowLogger
                logger.set_tags({"early_stopping.stopped": str(self.stopped).lower()})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_epoch": self.best_epoch, "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict.get("best_epoch", 0)
        self.stopped = state_dict.get("stopped", False)
