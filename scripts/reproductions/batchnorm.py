"""Item: batch normalization widens the range of good learning rates (Ioffe & Szegedy 2015), per optimizer, at CPU
size.

Config: ``conf/experiment/digits_mlp.yaml`` (digits, an MLP of two 100-unit ReLU layers, batches of 128) with
``model.batch_norm=false|true`` (a BatchNorm1d before each hidden ReLU), an lr grid of half decades from 1e-4 to 3
and a few seeds, for SGD, momentum SGD, Adam and AdaBound (its bound schedule at the defaults: final_lr 0.1,
hyperbolic γ 1e-3). Each (optimizer, batch_norm) is one population (``train_population`` with explicit member
settings: lr x seed), whose members each equal their standalone ``python train.py`` run; under one seed the BN and
plain models start from the same Linear weights (BatchNorm draws nothing), so a seed is a paired comparison.

A "good" lr: the mean final val_acc over seeds reaches ``THRESHOLD`` (absolute); and, relative to each setting's own
best, within ``TOLERANCE`` of it (so that a setting which only trains slower is not counted narrower for that alone).
Widths are counted in grid points, half a decade each. A diverged member counts as chance (val_acc 0.1). Writes
``batchnorm.json`` and ``batchnorm_lr.png`` (final val_acc against lr with and without BN, one panel per optimizer,
the lrs above the threshold shaded).
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics

import pytorch_lightning as pl

from ._common import compose, figure, save, table, write_json

OPTIMIZERS = ("sgd", "momentum", "adam", "adabound")
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
THRESHOLD = 0.9  # mean final val_acc of a good lr
TOLERANCE = 0.02  # val_acc below the setting's own best that still counts as near it
COLOR = {False: "#1f77b4", True: "#d62728"}


def defaults(a) -> None:
    """The document's sizes, or with --quick the tests'."""
    q = a.quick
    a.epochs = a.epochs or (1 if q else 30)
    a.seeds = a.seeds or (1 if q else 2)
    a.optimizers = ["sgd"] if q else list(OPTIMIZERS)
    a.lrs = [1e-2, 1.0] if q else list(LRS)


class Final(pl.Callback):
    """Each member's val_acc and val_loss after the last epoch (``PopulationTask.last``)."""

    def __init__(self):
        self.last: list[dict] = []

    def on_train_epoch_end(self, trainer, module):
        self.last = [dict(module.last[k]) for k in range(module.k)]


def run(args) -> dict:
    runs = []
    for name in args.optimizers:
        for bn in (False, True):
            runs += _population(name, bn, args)
    summary, ranges = _summary(runs, args)
    print(table(summary, ["optimizer", "lr", "acc_plain", "acc_bn"]))
    print(table(ranges, ["optimizer", "best_plain", "best_bn", "good_plain", "good_bn", "decades_plain", "decades_bn",
                         "near_best_decades_plain", "near_best_decades_bn"]))
    _plot(summary, ranges, args)
    data = {"settings": {"epochs": args.epochs, "seeds": args.seeds, "lrs": args.lrs, "threshold": THRESHOLD,
                         "tolerance": TOLERANCE,
                         "data": "digits (batch 128)", "model": "mlp [100, 100], batch_norm false|true"},
            "ranges": ranges, "summary": summary, "runs": runs}
    write_json(args.out, "batchnorm", data)
    return data


def _population(name: str, bn: bool, args) -> list[dict]:
    """One population: every lr x seed of optimizer ``name``, with or without batch norm."""
    from optstudy.population.run import train_population

    cfg = compose("experiment=digits_mlp", f"optimizer={name}", f"model.batch_norm={str(bn).lower()}",
                  f"trainer.max_epochs={args.epochs}")
    settings = [{"optimizer.lr": lr, "seed": seed} for lr in args.lrs for seed in range(args.seeds)]
    final = Final()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_population(cfg, settings, callbacks=[final])
    out = []
    for k, (setting, member) in enumerate(zip(settings, result.members)):
        diverged = member.diverged is not None
        acc = final.last[k].get("val_acc", float("nan")) if final.last else float("nan")
        out.append({"optimizer": name, "batch_norm": bn, "lr": setting["optimizer.lr"], "seed": setting["seed"],
                    "diverged": diverged, "val_acc": 0.1 if diverged or not math.isfinite(acc) else acc,
                    "val_loss": float("inf") if diverged else final.last[k].get("val_loss", float("inf"))})
    print(f"{name} batch_norm={bn}: {len(settings)} members in {result.seconds:.0f}s", flush=True)
    return out


def _summary(runs: list[dict], args) -> tuple[list[dict], list[dict]]:
    """Per optimizer and lr: mean final val_acc with and without BN; per optimizer: the lrs that reach THRESHOLD
    (their lowest and highest, and their count in half decades), and those within TOLERANCE of the setting's best."""
    rows, ranges = [], []
    for name in args.optimizers:
        acc = {(bn, lr): statistics.fmean(r["val_acc"] for r in runs
                                          if (r["optimizer"], r["batch_norm"], r["lr"]) == (name, bn, lr))
               for bn in (False, True) for lr in args.lrs}
        for lr in args.lrs:
            rows.append({"optimizer": name, "lr": lr, "acc_plain": acc[False, lr], "acc_bn": acc[True, lr]})
        row = {"optimizer": name}
        for bn, tag in ((False, "plain"), (True, "bn")):
            best = max(acc[bn, lr] for lr in args.lrs)
            good = [lr for lr in args.lrs if acc[bn, lr] >= THRESHOLD]
            near = [lr for lr in args.lrs if acc[bn, lr] >= best - TOLERANCE]
            row.update({f"best_{tag}": best, f"good_{tag}": [min(good), max(good)] if good else None,
                        f"decades_{tag}": 0.5 * len(good), f"near_best_decades_{tag}": 0.5 * len(near)})
        ranges.append(row)
    return rows, ranges


def _plot(summary: list[dict], ranges: list[dict], args) -> None:
    fig, axes = figure(1, len(args.optimizers), figsize=(3.6 * len(args.optimizers), 3.4), dpi=100)
    for col, name in enumerate(args.optimizers):
        ax = axes[0][col]
        rows = [r for r in summary if r["optimizer"] == name]
        span = next(r for r in ranges if r["optimizer"] == name)
        for bn, tag in ((False, "plain"), (True, "bn")):
            ax.plot([r["lr"] for r in rows], [r[f"acc_{tag}"] for r in rows], "o-", ms=3, color=COLOR[bn],
                    label=f"{'with' if bn else 'without'} BN ({span[f'decades_{tag}']:g} decades ≥ {THRESHOLD:g})")
            if span[f"good_{tag}"]:
                lo, hi = span[f"good_{tag}"]
                ax.axvspan(lo / 10**0.25, hi * 10**0.25, color=COLOR[bn], alpha=0.08)
        ax.axhline(THRESHOLD, color="#7f7f7f", lw=0.8, ls=":")
        ax.set(xscale="log", ylim=(0, 1), xlabel="lr", ylabel=f"val_acc after {args.epochs} epochs", title=name)
        ax.legend(fontsize=7, loc="lower center")
    save(fig, args.out / "batchnorm_lr.png")
