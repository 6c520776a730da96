"""Item 4: effective learning rates near convergence (AdaBound's Figure 1), docs/reproductions.md section 4.

Config: ``model=cnn data=digits optimizer=adam|adabound`` (``conf/model/cnn.yaml``, ``conf/data/digits.yaml``,
``conf/optimizer/{adam,adabound}.yaml`` at their defaults) with ``logger=mlflow`` on a temporary SQLite store, so that
each run writes ``eff_lr_histograms.npz`` (every ``--every`` steps) and ``eff_lr_heatmap.png`` into
``checkpoint.dir``. Writes ``efflr.json``, ``efflr.png`` and ``efflr_heatmap_<optimizer>.png``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from ._common import compose, figure, save, table, train, write_json

OPTIMIZERS = ("adam", "adabound")


def defaults(a) -> None:
    a.epochs = a.epochs or (2 if a.quick else 30)


class ZeroMoments(pl.Callback):
    """At the end of training, the fraction of each parameter's elements whose second moment v is exactly 0: never a
    non-zero gradient, so Adam's effective lr there is lr/eps (the histogram's top)."""

    def __init__(self):
        self.fractions: dict[str, float] = {}

    def on_train_end(self, trainer, module):
        opt = trainer.optimizers[0]
        for name, p in module.model.named_parameters():
            if p in opt.state:
                self.fractions[name] = float((opt.state[p]["exp_avg_sq"] == 0).float().mean())
        sizes = {n: p.numel() for n, p in module.model.named_parameters()}
        self.total = sum(self.fractions[n] * sizes[n] for n in self.fractions) / sum(sizes.values())


def run(args) -> dict:
    """model=cnn on digits with Adam and AdaBound through ``train`` with MLflow on (a temporary SQLite store), so
    that the run writes ``eff_lr_histograms.npz`` and ``eff_lr_heatmap.png`` into ``checkpoint.dir``."""
    data = {"settings": {"epochs": args.epochs, "every": args.every}, "optimizers": {}}
    fig, axes = figure(1, 2, figsize=(11, 3.8), dpi=100)
    with tempfile.TemporaryDirectory(prefix="reproduce-efflr-") as tmp, _tracking(Path(tmp)):
        for col, name in enumerate(OPTIMIZERS):
            arrays, data["optimizers"][name] = _optimizer(name, Path(tmp) / name, args)
            _plot(axes[0][col], name, arrays, data["optimizers"][name])
    for name, numbers in data["optimizers"].items():
        _print(name, numbers)
    save(fig, args.out / "efflr.png")
    write_json(args.out, "efflr", data)
    return data


@contextmanager
def _tracking(tmp: Path):
    """MLflow on a SQLite store in ``tmp`` while the runs last; the caller's ``MLFLOW_TRACKING_URI`` restored after."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _optimizer(name: str, run_dir: Path, args) -> tuple[dict, dict]:
    """One run with its artifacts in ``run_dir``: the npz's arrays and the numbers read from them."""
    cfg = compose("model=cnn", "data=digits", f"optimizer={name}", f"trainer.max_epochs={args.epochs}",
                  f"logger.eff_lr_every_n_steps={args.every}", f"checkpoint.dir={run_dir}",
                  "logger.experiment=reproduce_efflr", logger="mlflow")
    zeros = ZeroMoments()
    result, failed = train(cfg, [zeros])
    assert failed is None, failed
    shutil.copy(run_dir / "eff_lr_heatmap.png", args.out / f"efflr_heatmap_{name}.png")
    with np.load(run_dir / "eff_lr_histograms.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    numbers = _numbers(arrays, result, cfg)
    numbers.update(zero_v_fraction_end=zeros.total, zero_v_fraction_by_param=zeros.fractions)
    return arrays, numbers


def _numbers(arrays, result, cfg) -> dict:
    steps, edges = arrays["steps"], arrays["edges"]
    counts = arrays["counts"].sum(1).astype(float)  # all param groups: (records, bins)
    picks = {"start": 0, "middle": int(np.argmin(np.abs(steps - steps[-1] / 2))), "end": len(steps) - 1}
    centers = (edges[:-1] + edges[1:]) / 2
    records = {}
    for when, i in picks.items():
        frac = counts[i] / counts[i].sum()
        cdf = np.cumsum(frac)
        # the histogram's end bins also hold everything beyond [-10, 6] decades, so these are exact at 0.1 decade
        records[when] = {"step": int(steps[i]),
                         "median_log10": float(centers[np.searchsorted(cdf, 0.5)]),
                         "p1_log10": float(centers[np.searchsorted(cdf, 0.01)]),
                         "p99_log10": float(centers[np.searchsorted(cdf, 0.99)]),
                         "below_0.01": float(frac[edges[1:] <= -2 + 1e-9].sum()),
                         "above_1000": float(frac[edges[:-1] >= 3 - 1e-9].sum()),
                         # Adam's ceiling lr/(bc1·eps), reached where v = 0; within a bin of it (AdaBound: its
                         # upper bound is far lower, so none)
                         "at_lr_over_eps": float(frac[edges[:-1] >= _ceiling(cfg, int(steps[i])) - 0.1 - 1e-9].sum()),
                         "min_log10": float(arrays["min"][i].min()), "max_log10": float(arrays["max"][i].max())}
    out = {"records": records, "val_loss": result.metrics["val_loss"], "val_acc": result.metrics["val_acc"],
           "elements": int(counts[0].sum())}
    if "clipped" in arrays:
        clipped = arrays["clipped"]  # (records, groups, 2): fractions per group; weigh groups by their counts
        weights = arrays["counts"].sum(2) / arrays["counts"].sum((1, 2))[:, None]
        out["clipped_lower_end"] = float((clipped[-1, :, 0] * weights[-1]).sum())
        out["clipped_upper_end"] = float((clipped[-1, :, 1] * weights[-1]).sum())
    return out


def _ceiling(cfg, t: int) -> float:
    """log10 of Adam's largest effective lr at step t, lr/(bc1·eps) (v = 0), clamped to the histogram's range."""
    beta1 = cfg.optimizer.betas[0]
    return min(math.log10(cfg.optimizer.lr / (1 - beta1**t) / cfg.optimizer.eps), 6.0)


def _print(name: str, numbers: dict) -> None:
    print(f"\n{name}: val_loss {numbers['val_loss']:.4f}, val_acc {numbers['val_acc']:.4f}; elements with v = 0 at "
          f"the end: {numbers['zero_v_fraction_end']:.4f}" + (
              f"; clipped at the end: lower {numbers['clipped_lower_end']:.4f}, upper "
              f"{numbers['clipped_upper_end']:.4f}" if "clipped_upper_end" in numbers else ""))
    print(table([{"when": w, **r} for w, r in numbers["records"].items()],
                ["when", "step", "median_log10", "p1_log10", "p99_log10", "below_0.01", "above_1000",
                 "at_lr_over_eps"]))


def _plot(ax, name, arrays, numbers):
    edges = arrays["edges"]
    counts = arrays["counts"].sum(1).astype(float)
    index = {int(s): i for i, s in enumerate(arrays["steps"])}
    used = np.nonzero(counts.sum(0))[0]
    for (when, record), color in zip(numbers["records"].items(), ("#1f77b4", "#ff7f0e", "#2ca02c")):
        frac = counts[index[record["step"]]] / counts[index[record["step"]]].sum()
        ax.stairs(np.maximum(frac, 1e-7), edges, color=color, lw=1.3, label=f"{when} (step {record['step']})")
    ax.axvline(-2, color="grey", ls=":", lw=0.8)
    ax.axvline(3, color="grey", ls=":", lw=0.8)
    ax.set(yscale="log", ylim=(1e-6, 1.5), xlim=(edges[used[0]] - 0.5, edges[used[-1] + 1] + 0.5),
           xlabel="log10 effective lr",
           ylabel="fraction of elements", title=f"{name} on the digits CNN (dotted: 0.01 and 1000)")
    ax.legend(fontsize=8)
