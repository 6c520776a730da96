"""Early stopping per member of a population (``trainer.early_stopping``, see ``optstudy.early``).

Each member has its own Lightning ``EarlyStopping`` (its rule, its state: best value, wait count) fed with that
member's monitored value after each epoch's validation, as a standalone run's callback is fed from
``callback_metrics``: member k stops after the epoch its standalone run stops after. A stopped member is frozen, its
run ended FINISHED with the ``early_stopping/*`` metrics a standalone run records, and cut out of the stack with the
diverged and pruned ones (``PopulationTask.stop_early``, ``COMPACT_AT``), so it costs no compute from then on. The
population ends when every member has stopped.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from optstudy import early


def callbacks(cfg, k: int) -> list:
    """``[MemberEarlyStopping]`` for ``k`` members when ``trainer.early_stopping`` is on, else ``[]``."""
    chosen = early.settings(cfg)
    return [] if chosen is None else [MemberEarlyStopping(chosen, k)]


class MemberEarlyStopping(pl.Callback):
    """``chosen``: ``optstudy.early.settings``; one rule per member, ``k`` members."""

    def __init__(self, chosen: dict, k: int):
        self.monitor = chosen["monitor"]
        self.rules = [pl.callbacks.EarlyStopping(**chosen) for _ in range(k)]
        self.best_epoch = [0] * k  # 1-based epoch of each member's best value
        self.epochs_run = [0] * k

    def on_train_epoch_end(self, trainer, task):  # after this epoch's validation; the stack is cut after this
        epoch = trainer.current_epoch + 1
        for k in task.alive():
            value = task.last[k].get(self.monitor)
            if value is None:
                continue
            rule = self.rules[k]
            before = rule.best_score.clone()
            # float32, as a standalone run's callback_metrics hold it (Lightning's self.log makes a float32 tensor)
            stop, _ = rule._evaluate_stopping_criteria(torch.tensor(value, dtype=torch.float32))
            self.epochs_run[k] = epoch
            if not torch.equal(before, rule.best_score):
                self.best_epoch[k] = epoch
            if stop:
                self._record(trainer, task, k, stopped=True)
                task.stop_early(k)  # ends its run: its metrics first

    def on_train_end(self, trainer, task):
        for k in task.alive():  # ran to the end
            self._record(trainer, task, k, stopped=False)

    def summary(self, k: int, stopped: bool) -> dict[str, float]:
        return early.summary(self.epochs_run[k], stopped, float(self.rules[k].best_score), self.best_epoch[k])

    def _record(self, trainer, task, k: int, stopped: bool) -> None:
        values = self.summary(k, stopped)
        task.last[k].update(values)  # the member's result carries them, as a standalone run's metrics do
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_member_metrics"):
            logger.log_member_metrics({k: values}, trainer.global_step)
            logger.experiment.set_tag(logger.run_ids[k], "early_stopping.stopped", str(stopped).lower())
