"""Lightning callbacks for your own LightningModule: effective-learning-rate logging and Optuna pruning.

    from optstudy import optim
    from optstudy.callbacks import EffectiveLR, OptunaPruning

    class Net(pl.LightningModule):
        def configure_optimizers(self):
            return optim.build("adabound", self.parameters(), lr=1e-3, final_lr=0.1)

    trainer = pl.Trainer(logger=MLFlowLogger(...), callbacks=[EffectiveLR(every=25), OptunaPruning(trial)])

``EffectiveLR`` logs, every ``every`` optimizer steps (and after the first and the last), to every logger of the
Trainer, per param group ``g`` (the metrics optstudy's own runs have):

- ``eff_lr/g{g}/p1``, ``p5``, ``p25``, ``p50``, ``p75``, ``p95``, ``p99``, ``min``, ``max``: quantiles of **log10**
  of the per-element effective learning rate of that step (accurate to a bin, 0.1 decade);
- ``eff_lr/g{g}/clipped_lower``, ``clipped_upper`` (AdaBound/AMSBound): fractions of elements at the bounds.

At the end of training (also when it stops on an exception, e.g. a pruned trial), with an MLflow logger (Lightning's
``pytorch_lightning.loggers.MLFlowLogger`` or optstudy's ``optstudy.tracking.MLflowLogger``), it adds to that
logger's run the artifacts ``eff_lr_histograms.npz`` (the histograms over time: ``steps``, ``edges``, ``counts``
``(records, groups, bins)``, ``min``, ``max``, and ``clipped``/``bounds`` for AdaBound/AMSBound) and
``eff_lr_heatmap.png`` (training step x log10 lr, as AdaBound's Figure 1).

``OptunaPruning`` reports the monitored metric to an Optuna trial after each validation and raises
``optuna.TrialPruned`` when the study's pruner says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytorch_lightning as pl

from optstudy import lrlog

__all__ = ["EffectiveLR", "OptunaPruning"]


class EffectiveLR(lrlog.EffectiveLR):
    """Logs effective-lr quantiles every ``every`` steps and puts the histograms and heatmap into the MLflow run.

    Args:
        every: optimizer steps between two records (each record: one histogram, one set of quantile metrics).
        bins, low, high: the histogram's bins over ``[low, high]`` decades of log10 lr (outside: the end bins).
        draw: also draw ``eff_lr_heatmap.png`` (matplotlib, ~0.3 s) besides the npz.
        dirpath: where the files are kept; ``None``: a temporary directory, deleted once they are in MLflow (with no
            MLflow logger and no ``dirpath`` the files are not written; the quantiles still go to every logger).

    The trainer's optimizer must come from ``optstudy.optim`` (its effective lrs are what is binned); anything else
    raises ``optstudy.ConfigError`` when training starts. The files are written on rank 0 only.
    """

    def __init__(self, every: int = 25, bins: int = 160, low: float = -10.0, high: float = 6.0, draw: bool = True,
                 dirpath: str | Path | None = None):
        super().__init__(every, bins, low, high, draw)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.saved: list[Path] = []  # the files of the last save, for a caller who wants them

    def on_train_end(self, trainer, module):
        super().on_train_end(trainer, module)  # the last step's record
        self._publish(trainer, module)

    def on_exception(self, trainer, module, exception):
        # Lightning finalizes its loggers after this hook: a pruned or failed run still gets its histograms
        self._publish(trainer, module)

    def _publish(self, trainer, module) -> None:
        runs = mlflow_runs(trainer)
        if not trainer.is_global_zero or not self.records or (not runs and self.dirpath is None):
            return
        title = f"{type(trainer.optimizers[0]).__name__} on {type(module).__name__}"
        if self.dirpath is not None:
            self.saved = self.save(self.dirpath, title=title)
            _upload(runs, self.saved)
            return
        with tempfile.TemporaryDirectory(prefix="eff_lr_") as tmp:
            _upload(runs, self.save(Path(tmp), title=title))


def mlflow_runs(trainer) -> list:
    """The Trainer's loggers that write to an MLflow run: Lightning's ``MLFlowLogger`` and optstudy's own."""
    from pytorch_lightning.loggers import MLFlowLogger

    from optstudy.tracking import MLflowLogger

    return [lg for lg in trainer.loggers if isinstance(lg, (MLFlowLogger, MLflowLogger))]


def _upload(loggers: list, paths: list[Path]) -> None:
    # both loggers expose the MlflowClient as ``experiment`` and create their run on first use
    for logger in loggers:
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path))


class OptunaPruning(pl.Callback):
    """Reports ``monitor`` to ``trial`` after each validation and raises ``optuna.TrialPruned`` when it should prune.

    Args:
        trial: the ``optuna.Trial`` this training is the objective of.
        monitor: a metric the module logs in validation (``self.log("val_loss", ...)``).
        offset: added to the epoch to give the reported step (``offset + epoch``, epochs from 0), so that several
            trainings of one trial (seeds, say) report one continuing curve.

    The step is the epoch: with several validations per epoch (``val_check_interval``) the first of each epoch is
    reported, as Optuna keeps one value per step. A metric absent from ``trainer.callback_metrics`` (not logged
    yet) is skipped. Sanity-check validation is never reported.
    """

    def __init__(self, trial, monitor: str = "val_loss", offset: int = 0):
        self.trial, self.monitor, self.offset = trial, monitor, offset
        self._reported: set[int] = set()

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.report(trainer)

    def report(self, trainer) -> None:
        """Reports the monitored metric at step ``offset + epoch`` (once per step); raises ``optuna.TrialPruned``
        when the pruner says so."""
        import optuna

        value = trainer.callback_metrics.get(self.monitor)
        step = self.offset + trainer.current_epoch
        if value is None or step in self._reported:  # Optuna would warn and ignore a second value of a step
            return
        self._reported.add(step)
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {trainer.current_epoch + 1} ({self.monitor}={float(value):.4g})")
