"""Item 1: AMSGrad's counterexample (Reddi et al. 2018, Sec. 3 and 5), docs/reproductions.md section 1.

Config: ``conf/experiment/counterexample.yaml`` (online, also at ``model.scale=10``) and
``conf/experiment/counterexample_stochastic.yaml`` (one run per seed), each with ``optimizer=adam|amsgrad|adabound|
amsbound``, through ``train`` with a callback that records x at every step.
Writes ``counterexample.json`` and ``counterexample.png``.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl

from ._common import COLORS, compose, epochs, figure, save, train, write_json

BETA_OPTIMIZERS = ("adam", "amsgrad", "adabound", "amsbound")
BOUNDED = ("adabound", "amsbound")


def defaults(a) -> None:
    """The document's sizes, or with --quick the tests'."""
    a.steps = a.steps or (1000 if a.quick else 3000)
    a.stochastic_steps = a.stochastic_steps or (200 if a.quick else 8000)
    a.seeds = a.seeds or (1 if a.quick else 3)


class Clipped(pl.Callback):
    """For AdaBound/AMSBound: the number of steps whose step size was raised to the lower bound or cut to the upper
    one (``optstudy.optim.lr_histogram``'s clipped fractions; the counterexample has one element)."""

    def __init__(self):
        self.lower = self.upper = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        from optstudy.optim import lr_histogram

        hist = lr_histogram(trainer.optimizers[0])
        if hist.clipped_lower is not None:
            self.lower += int(hist.clipped_lower.sum() > 0)
            self.upper += int(hist.clipped_upper.sum() > 0)


def run(args) -> dict:
    """experiment=counterexample and counterexample_stochastic through ``train`` with a trajectory callback."""
    seeds = list(range(args.seeds))
    variants = {
        "online": ("counterexample", [], args.steps, [0]),
        "online_scale10": ("counterexample", ["model.scale=10"], args.steps, [0]),
        "stochastic": ("counterexample_stochastic", [], args.stochastic_steps, seeds),
    }
    results, paths = {}, {}
    for variant, (experiment, extra, steps, variant_seeds) in variants.items():
        results[variant], paths[variant] = {}, {}
        for name in BETA_OPTIMIZERS:
            results[variant][name], paths[variant][name] = _optimizer(
                variant, name, experiment, [*extra, *epochs(steps)], variant_seeds)
    data = {
        "settings": {"betas": [0.9, 0.99], "lr": "1/sqrt(t)", "x0": 0.0, "steps": args.steps,
                     "stochastic_steps": args.stochastic_steps, "stochastic_seeds": seeds,
                     "final_lr": 0.1, "gamma": 1e-3},
        "results": results,
        "commands": [f"python train.py experiment=counterexample optimizer={n}" for n in BETA_OPTIMIZERS]
        + ["python train.py experiment=counterexample optimizer=adabound model.scale=10",
           "python train.py experiment=counterexample_stochastic optimizer=amsgrad seed=1"],
    }
    _plot(paths, seeds[0], args.out)
    write_json(args.out, "counterexample", data)
    return data


def _optimizer(variant: str, name: str, experiment: str, extra: list[str], seeds: list[int]) -> tuple[dict, list]:
    """One optimizer on one variant, once per seed: its numbers, and the first seed's path x_0..x_T."""
    from optstudy.lit import Trajectory

    bounded = name in BOUNDED  # the per-step histogram only where there are bounds
    finals, clipped, path = [], [], None
    for seed in seeds:
        recorder, clip = Trajectory(), Clipped()
        cfg = compose(f"experiment={experiment}", f"optimizer={name}", f"seed={seed}", *extra)
        _, failed = train(cfg, [recorder, clip] if bounded else [recorder])
        assert failed is None, failed
        xs = [r["x"] for r in recorder.rows]
        finals.append(xs[-1])
        clipped.append([clip.lower, clip.upper])
        path = xs if path is None else path
    last = np.asarray(path[-101:])  # the last period (first seed): x oscillates within it
    numbers = {"final_x": finals[0] if len(finals) == 1 else finals, "mean_final_x": float(np.mean(finals)),
               "last_period_mean": float(last.mean()), "last_period_min": float(last.min()),
               "last_period_max": float(last.max())}
    if bounded:  # steps clipped at [lower, upper], per seed
        numbers["clipped_steps"] = clipped[0] if len(clipped) == 1 else clipped
    print(f"{variant:15s} {name:9s} x_T = {', '.join(f'{x:+.3f}' for x in finals)}   last 101 steps: mean "
          f"{last.mean():+.3f}, range [{last.min():+.3f}, {last.max():+.3f}]" + (
              f"   steps clipped (lower, upper): {clipped}" if bounded else ""))
    return numbers, path


def _plot(paths: dict, seed: int, out) -> None:
    fig, axes = figure(1, 3, figsize=(13, 3.8), dpi=100)
    titles = {"online": "online: f_t = 101x (t mod 101 = 1), else -x",
              "online_scale10": "online, model.scale=10: 1010x / -10x",
              "stochastic": f"stochastic: 101x w.p. 0.01, else -x (seed {seed})"}
    for ax, (variant, lines) in zip(axes[0], paths.items()):
        for i, (name, xs) in enumerate(lines.items()):
            # the bounded ones dashed and thin over the unbounded ones, which they often equal
            bounded = name in BOUNDED
            ax.plot(np.arange(len(xs)), xs, color=COLORS[i], ls="--" if bounded else "-", lw=1.1 if bounded else 2.6,
                    alpha=1.0 if bounded else 0.55, label=name)
        ax.axhline(-1, color="crimson", lw=0.8, ls=":")
        ax.set(title=titles[variant], xlabel="step t", ylabel="x_t", ylim=(-1.05, 1.05))
        ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=8, loc="center right")
    save(fig, out / "counterexample.png")
