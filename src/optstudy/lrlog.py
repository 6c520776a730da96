"""Effective learning rates over training: quantiles as metrics, full histograms as an artifact and a heatmap.

Every ``every`` optimizer steps (and after the first), ``EffectiveLR`` bins log10 of each element's effective learning
rate (``optstudy.optim.lr_histogram``) and logs, per param group ``g``:

- ``eff_lr/g{g}/p1 ... p99``, ``min``, ``max``: quantiles of **log10** effective lr (accurate to a bin, 0.1 decade);
- ``eff_lr/g{g}/clipped_lower``, ``clipped_upper``: fractions of elements at AdaBound's bounds (bounded optimizers).

At the end the histograms over time are saved (``eff_lr_histograms.npz``) and drawn as a heatmap of training step x
log10 lr (``eff_lr_heatmap.png``), as in AdaBound's Figure 1: Adam's rates spreading to extremes, AdaBound's gathering
at final_lr.

This module's ``EffectiveLR`` records; optstudy's ``train.py`` writes its files and uploads them with the run's other
artifacts. In your own Lightning code use ``optstudy.callbacks.EffectiveLR``, which also puts them into the MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import Callback

from optstudy.errors import ConfigError
from optstudy.optim import CoreOptimizer, lr_histogram

QUANTILES = {"p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99}


def summary(hist, group: int) -> dict[str, float]:
    """The metrics of one group of one histogram (non-finite values, e.g. a group that never stepped, left out)."""
    q = hist.quantiles(list(QUANTILES.values()), group).tolist()
    out = dict(zip(QUANTILES, q), min=hist.min[group].item(), max=hist.max[group].item())
    if hist.clipped_lower is not None:
        out.update(clipped_lower=hist.clipped_lower[group].item(), clipped_upper=hist.clipped_upper[group].item())
    return {k: v for k, v in out.items() if np.isfinite(v)}


class EffectiveLR(Callback):
    """Logs effective-lr quantiles every ``every`` steps and keeps the histograms for ``save``."""

    def __init__(self, every: int = 25, bins: int = 160, low: float = -10.0, high: float = 6.0, draw: bool = True):
        self.every, self.bins, self.low, self.high, self.draw = every, bins, low, high, draw
        self.steps: list[int] = []
        self.records: list = []  # LRHistogram per recorded step
        self.bounds: list = []  # per recorded step: [[lower, upper] per group], for AdaBound/AMSBound

    def on_train_start(self, trainer, module):
        # a torch.optim optimizer has no per-element effective lr to bin: say so now, not mid-epoch
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if not isinstance(opt, CoreOptimizer):
            raise ConfigError(f"EffectiveLR needs an optimizer of optstudy.optim (configure_optimizers returning "
                              f"optstudy.optim.build(name, self.parameters(), ...)), got {type(opt).__name__}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step  # already counts the step just taken: the t of the update it describes
        if trainer.is_global_zero and (step % self.every == 0 or step == 1):
            self._record(trainer, step)

    def on_train_end(self, trainer, module):
        # the last update too: a short run's last record was otherwise mid-training (step 25 of 46)
        step = trainer.global_step
        if trainer.is_global_zero and step > 0 and (not self.steps or self.steps[-1] != step):
            self._record(trainer, step)

    def _record(self, trainer, step: int) -> None:
        opt = trainer.optimizers[0]
        hist = lr_histogram(opt, self.bins, self.low, self.high)
        metrics = {f"eff_lr/g{g}/{k}": v for g in range(hist.counts.shape[0]) for k, v in summary(hist, g).items()}
        for logger in trainer.loggers:  # every logger the user gave the Trainer (train.py gives one or none)
            logger.log_metrics(metrics, step)
        self.steps.append(step)
        self.records.append(hist)
        if hasattr(opt, "bounds"):  # AdaBound's (lower, upper) of this update, per group, to draw on the heatmap
            self.bounds.append([[float(b) for b in opt.bounds(g, step)] for g in opt.param_groups])

    def save(self, directory: Path, model=None, title: str = "") -> list[Path]:
        """Writes the npz and (``draw``) the heatmap into ``directory``; returns their paths (none if nothing was
        recorded)."""
        if not self.records:
            return []
        directory.mkdir(parents=True, exist_ok=True)
        arrays = dict(
            steps=np.array(self.steps), edges=self.records[0].edges.numpy(),
            counts=torch.stack([h.counts for h in self.records]).numpy(),  # (records, groups, bins)
            min=torch.stack([h.min for h in self.records]).numpy(), max=torch.stack([h.max for h in self.records]).numpy())
        if self.records[0].clipped_lower is not None:
            arrays["clipped"] = torch.stack([torch.stack([h.clipped_lower, h.clipped_upper], -1)
                                             for h in self.records]).numpy()  # (records, groups, 2)
        if self.bounds:
            arrays["bounds"] = np.array(self.bounds)  # (records, groups, 2): lower, upper
        data = directory / "eff_lr_histograms.npz"
        np.savez_compressed(data, **arrays)
        if not self.draw:  # the histograms are the data; a study's report draws its best runs' heatmaps from them
            return [data]
        return [data, heatmap(arrays, directory / "eff_lr_heatmap.png", title)]


def heatmap(arrays: dict, path: Path, title: str = "") -> Path:
    """Training step (x) by log10 effective lr (y), colour = fraction of elements (log scale), median in red and, for
    AdaBound/AMSBound, the bounds in white."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    steps, edges = arrays["steps"], arrays["edges"]
    counts = arrays["counts"].sum(1).astype(float)  # all groups together: (records, bins)
    frac = counts / counts.sum(1, keepdims=True).clip(min=1)
    # each record stands for the steps up to the next one
    x = np.append(steps, steps[-1] + max(1, steps[-1] - steps[-2] if len(steps) > 1 else 1))
    fig = Figure(figsize=(7, 4), dpi=110)
    # fixed margins that fit the labels: tight_layout measured every text of the figure, half of its 0.3 s (a
    # population of 144 members draws 144 of these)
    fig.subplots_adjust(left=0.09, right=0.91, bottom=0.12, top=0.92)
    ax = fig.add_subplot()
    shown = np.ma.masked_less_equal(frac.T, 0)
    mesh = ax.pcolormesh(x, edges, shown, norm=LogNorm(vmin=max(shown.min(), 1e-6), vmax=1), cmap="viridis")
    centers = (edges[:-1] + edges[1:]) / 2
    median = [centers[min(np.searchsorted(np.cumsum(f), 0.5), len(f) - 1)] for f in frac]
    ax.plot(steps, median, color="orangered", lw=1.2, label="median")
    lo, hi = _used_range(counts, edges)
    if "bounds" in arrays:  # AdaBound's clip range (group 0), where it is finite, and the range widened to show it
        with np.errstate(divide="ignore"):
            bounds = np.log10(arrays["bounds"][:, 0, :])
        for i, (name, style) in enumerate([("lower bound", "--"), ("upper bound", ":")]):
            ok = np.isfinite(bounds[:, i])
            if ok.any():
                ax.plot(steps[ok], bounds[ok, i], color="deeppink", ls=style, lw=1.4, label=name)
                lo = max(edges[0], min(lo, bounds[ok, i].min() - 0.5))
                hi = min(edges[-1], max(hi, bounds[ok, i].max() + 0.5))
    ax.set(ylim=(lo, hi), xlabel="training step", ylabel="log10 effective learning rate",
           title=title or "effective learning rates")
    ax.legend(loc="upper right", fontsize=8)
    bar = fig.colorbar(mesh, ax=ax, label="fraction of elements", fraction=0.08, pad=0.02)
    # the colorbar's 8 unlabelled minor ticks a decade and its mathtext labels (10^-6) took 162 -> 116 ms a heatmap
    bar.ax.minorticks_off()
    bar.ax.yaxis.set_major_formatter("{x:g}")  # 1e-06 ... 1
    fig.savefig(path)
    return path


def _used_range(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """The lr range that holds any element, padded by a decade, so the picture is not mostly empty."""
    used = np.nonzero(counts.sum(0))[0]
    if not len(used):
        return edges[0], edges[-1]
    return max(edges[0], edges[used[0]] - 1), min(edges[-1], edges[used[-1] + 1] + 1)
