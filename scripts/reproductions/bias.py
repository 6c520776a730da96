"""Item 5: Adam with and without bias correction (Adam paper, Sec. 6.4 and Fig. 4), docs/reproductions.md section 5.

Config: ``conf/experiment/digits_mlp.yaml`` with ``optimizer.bias_correction=true|false`` over a grid of
``optimizer.betas`` and ``optimizer.lr`` (``defaults`` below) and ``divergence.factor=null``, through ``train`` with a
callback that keeps every step's loss. Writes ``bias.json`` and ``bias.png``.
"""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl

from ._common import compose, figure, save, train, write_json

STEPS_PER_EPOCH = math.ceil(1437 / 128)  # experiment=digits_mlp: the digits training split in batches of 128


def defaults(a) -> None:
    """The grid and sizes: the document's, or with --quick the tests'."""
    q = a.quick
    a.epochs = a.epochs or (2 if q else 20)
    a.early_epoch = 1 if q else 2
    a.early_steps = 12 if q else 24
    a.lrs = [1e-3, 1e-2] if q else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    a.beta1 = [0.0] if q else [0.0, 0.9]
    a.beta2 = [0.9999] if q else [0.99, 0.999, 0.9999]


class Recorder(pl.Callback):
    """The training loss after every step and the validation loss after every epoch (``trainer.callback_metrics``)."""

    def __init__(self):
        self.train_loss: list[float] = []
        self.val_loss: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train_loss.append(float(trainer.callback_metrics["train_loss"]))

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        if "val_loss" in trainer.callback_metrics:
            self.val_loss.append(float(trainer.callback_metrics["val_loss"]))


def run(args) -> dict:
    """experiment=digits_mlp with optimizer.bias_correction=true|false over betas and lrs, through ``train`` with a
    callback that keeps the loss of every step and the validation loss of every epoch."""
    lrs = args.lrs
    grid = [(b1, b2) for b1 in args.beta1 for b2 in args.beta2]
    runs = [_run(b1, b2, lr, correction, args) for b1, b2 in grid for lr in lrs for correction in (True, False)]
    keys = (f"val_loss_epoch{args.early_epoch}", f"val_loss_epoch{args.epochs}", f"max_train_loss_first{args.early_steps}")
    summary = []
    for b1, b2 in grid:
        for lr in lrs:
            on, off = (_find(runs, b1, b2, lr, c) for c in (True, False))
            summary.append({"beta1": b1, "beta2": b2, "lr": lr,
                            **{f"{k}_{tag}": r[k] for tag, r in (("on", on), ("off", off)) for k in keys}})
    _plot(args, runs, lrs, grid)
    data = {"settings": {"lrs": lrs, "beta1": args.beta1, "beta2": args.beta2, "epochs": args.epochs,
                         "early_epoch": args.early_epoch, "early_steps": args.early_steps,
                         "steps_per_epoch": STEPS_PER_EPOCH},
            "summary": summary, "runs": [{k: v for k, v in r.items() if k != "train_loss"} for r in runs]}
    write_json(args.out, "bias", data)
    return data


def _run(b1: float, b2: float, lr: float, correction: bool, args) -> dict:
    recorder = Recorder()
    cfg = compose("experiment=digits_mlp", f"optimizer.lr={lr}", f"optimizer.betas=[{b1},{b2}]",
                  f"optimizer.bias_correction={str(correction).lower()}", f"trainer.max_epochs={args.epochs}",
                  "divergence.factor=null")  # the early blow-up is what is reproduced; NaN still stops
    _, failed = train(cfg, [recorder])
    val = recorder.val_loss + [float("inf")] * (args.epochs - len(recorder.val_loss))
    first = recorder.train_loss[: args.early_steps]
    print(f"beta1={b1} beta2={b2} lr={lr:g} correction={correction!s:5}: "
          f"val_loss epoch {args.early_epoch} {val[args.early_epoch - 1]:.4g}, "
          f"epoch {args.epochs} {val[-1]:.4g}" + ("  DIVERGED" if failed else ""))
    return {"beta1": b1, "beta2": b2, "lr": lr, "bias_correction": correction, "diverged": failed is not None,
            f"val_loss_epoch{args.early_epoch}": val[args.early_epoch - 1], f"val_loss_epoch{args.epochs}": val[-1],
            f"max_train_loss_first{args.early_steps}": max(first) if first else float("inf"),
            "train_loss": recorder.train_loss}


def _find(runs: list[dict], b1: float, b2: float, lr: float, correction: bool) -> dict:
    return next(r for r in runs if (r["beta1"], r["beta2"], r["lr"], r["bias_correction"]) == (b1, b2, lr, correction))


def _plot(args, runs, lrs, grid):
    """val_loss against lr after the early and the last epoch (one column per β2), and below, the batch loss of the
    first three epochs at the largest lr, where the uncorrected steps blow up."""
    betas2 = list(dict.fromkeys(b2 for _, b2 in grid))
    betas1 = list(dict.fromkeys(b1 for b1, _ in grid))
    keys = [(f"val_loss_epoch{args.early_epoch}", f"after epoch {args.early_epoch}"),
            (f"val_loss_epoch{args.epochs}", f"after epoch {args.epochs}")]
    fig, axes = figure(len(keys) + 1, len(betas2), figsize=(4.2 * len(betas2), 3.3 * (len(keys) + 1)), dpi=100)
    for col, b2 in enumerate(betas2):
        for row, (key, when) in enumerate(keys):
            ax = axes[row][col]
            for b1, ls in zip(betas1, ("-", "--", ":")):
                for correction, color in ((True, "#d62728"), (False, "#2ca02c")):
                    ys = [_find(runs, b1, b2, lr, correction)[key] for lr in lrs]
                    ys = [y if math.isfinite(y) else np.nan for y in ys]
                    ax.plot(lrs, ys, "o" + ls, color=color, ms=3,
                            label=f"β1={b1}, {'with' if correction else 'without'} correction")
            ax.set(xscale="log", yscale="log", xlabel="lr", ylabel="val_loss", title=f"β2={b2}, {when}")
        # the worst case early on: the largest lr, the loss of every step
        ax = axes[len(keys)][col]
        lr = lrs[-1]
        for b1, ls in zip(betas1, ("-", "--", ":")):
            for correction, color in ((True, "#d62728"), (False, "#2ca02c")):
                r = _find(runs, b1, b2, lr, correction)
                steps = min(len(r["train_loss"]), 3 * STEPS_PER_EPOCH)
                ax.plot(np.arange(1, steps + 1), r["train_loss"][:steps], ls, color=color, lw=1)
        ax.set(yscale="log", xlabel="step", ylabel="train_loss (batch)", title=f"β2={b2}, lr {lr:g}: first steps")
    axes[0][0].legend(fontsize=7)
    axes[len(keys)][0].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7)
    save(fig, args.out / "bias.png")
