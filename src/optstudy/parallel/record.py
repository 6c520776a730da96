"""The parent's record of a parallel run: what the processes report (``loop.Report``) becomes the MLflow run's
metrics, the epoch lines, the effective-lr artifacts and the run's result. MLflow is written from this process only.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from optstudy.parallel.loop import Delays


class Record:
    """Handles the processes' reports in order (``handle``) and ends the run (``finish``)."""

    def __init__(self, cfg, logger, out: Path):
        from optstudy import lrlog

        self.cfg, self.logger, self.out = cfg, logger, out
        self.epochs = int(cfg.trainer.max_epochs)
        self.eff_lr = lrlog.EffectiveLR(int(cfg.logger.get("eff_lr_every_n_steps", 25)),
                                        draw=bool(cfg.logger.get("eff_lr_heatmap", True)))
        self.last: dict[str, float] = {}
        self.epoch_seconds: list[float] = []
        self.delay_counts: dict[int, list] = {}  # rank -> its latest delay counts

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.last.update(metrics)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step)

    def handle(self, message: tuple) -> None:
        kind, *rest = message
        getattr(self, f"_{kind}")(*rest)

    def _log(self, metrics: dict, step: int) -> None:
        self.log(metrics, step)

    def _delays(self, rank: int, counts: list, step: int) -> None:
        self.delay_counts[rank] = counts
        total = Delays()
        for c in self.delay_counts.values():
            total.merge(c)
        self.log(total.metrics(), step)

    def _eff_lr(self, step: int, pickled: bytes, bounds) -> None:
        import pickle

        from optstudy.lrlog import summary

        if self.logger is None:
            return
        hist = pickle.loads(pickled)
        self.log({f"eff_lr/g{g}/{k}": v for g in range(hist.counts.shape[0]) for k, v in summary(hist, g).items()},
                 step)
        self.eff_lr.steps.append(step)
        self.eff_lr.records.append(hist)
        if bounds is not None:
            self.eff_lr.bounds.append(bounds)

    def _epoch(self, epoch: int, step: int, metrics: dict, seconds: float) -> None:
        self.log(metrics, step)
        self.epoch_seconds.append(seconds)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(self.last.items()) if "/" not in k)
        print(f"epoch {epoch + 1}/{self.epochs}  step {step}  {shown}  ({seconds:.1f}s)", flush=True)

    def finish(self) -> None:
        """Artifacts (the config, effective-lr histograms and heatmap) and the run FINISHED."""
        if self.logger is None:
            return
        from optstudy.train import _resolved, run_name

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(_resolved(self.cfg)))
        paths = [self.out / "config.yaml"]
        paths += self.eff_lr.save(self.out, None, run_name(self.cfg))  # one process reports them, in order
        self.logger.close("FINISHED", artifacts=paths, spill=self.out / "undelivered_metrics.jsonl")
