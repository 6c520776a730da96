"""Item: curriculum learning vs shuffled order (Bengio et al. 2009; Zaremba & Sutskever 2014), at CPU size.

Config: ``conf/experiment/mnist1d_mlp.yaml`` (MNIST-1D, an MLP of two 100-unit layers, batches of 128) with
``data.order=shuffle|fixed|curriculum|anti_curriculum|mixed`` and ``curriculum`` with
``data.curriculum.balanced=true`` (ranked within each class), ``data.curriculum.start=0.2``,
``data.curriculum.epochs`` = a third of the epochs and ``data.curriculum.mix=0.2``, for a few optimizers, lrs and
seeds. Each optimizer is one population (``train_population`` with explicit member settings: every order x lr x
seed), whose members each equal their standalone ``python train.py`` run; a seed is a paired comparison (the same
data, the same initial weights, only the order differs). The difficulty score is the default one: the per-example
loss of the fixed logistic-regression reference run (``optstudy.data._difficulty``), cached.

Writes ``curriculum.json`` and ``curriculum.png`` (val_acc over the epochs, mean over seeds, per optimizer and lr).
"""

from __future__ import annotations

import contextlib
import io
import statistics

import numpy as np

from ._common import Curves, compose, figure, save, table, write_json

# each arm's member settings beside lr and seed: the five orders, and the curriculum ranked within each class
ARMS = {"shuffle": {"data.order": "shuffle"}, "fixed": {"data.order": "fixed"},
        "curriculum": {"data.order": "curriculum"}, "anti_curriculum": {"data.order": "anti_curriculum"},
        "mixed": {"data.order": "mixed"},
        "curriculum_balanced": {"data.order": "curriculum", "data.curriculum.balanced": True}}
ORDERS = tuple(ARMS)
COLOR = {"shuffle": "#1f77b4", "fixed": "#7f7f7f", "curriculum": "#2ca02c", "anti_curriculum": "#d62728",
         "mixed": "#ff7f0e", "curriculum_balanced": "#9467bd"}
LRS = {"sgd": [0.03, 0.1], "momentum": [0.01, 0.03], "adam": [1e-3, 3e-3]}


def defaults(a) -> None:
    """The document's sizes, or with --quick the tests'."""
    q = a.quick
    a.epochs = a.epochs or (2 if q else 30)
    a.seeds = a.seeds or (1 if q else 4)
    a.optimizers = ["adam"] if q else list(LRS)
    a.lrs = {name: LRS[name][:1] if q else LRS[name] for name in a.optimizers}
    a.pace = max(1, a.epochs // 3)
    a.num_samples = 1000 if q else 5000


def run(args) -> dict:
    runs = []
    for name in args.optimizers:
        runs += _population(name, args)
    summary = _summary(runs, args)
    print(table(summary, ["optimizer", "lr", "order", "early_acc", "final_acc", "best_acc", "final_loss",
                          "early_vs_shuffle", "final_vs_shuffle"]))
    _plot(runs, args)
    data = {"settings": {"epochs": args.epochs, "seeds": args.seeds, "lrs": args.lrs, "orders": list(ORDERS),
                         "curriculum": {"start": 0.2, "epochs": args.pace, "mix": 0.2},
                         "data": f"mnist1d num_samples={args.num_samples}", "model": "mlp [100, 100]",
                         "early": f"mean val_acc over epochs 1..{args.pace} (while the pool grows)"},
            "summary": summary, "runs": runs}
    write_json(args.out, "curriculum", data)
    return data


def _population(name: str, args) -> list[dict]:
    """One population: every order x lr x seed of optimizer ``name``."""
    from optstudy.population.run import train_population

    cfg = compose("experiment=mnist1d_mlp", f"optimizer={name}", f"trainer.max_epochs={args.epochs}",
                  f"data.num_samples={args.num_samples}", "data.curriculum.start=0.2",
                  f"data.curriculum.epochs={args.pace}", "data.curriculum.mix=0.2")
    settings = [{"optimizer.lr": lr, "seed": seed, **ARMS[arm]}
                for arm in ORDERS for lr in args.lrs[name] for seed in range(args.seeds)]
    arms = [arm for arm in ORDERS for _ in args.lrs[name] for _ in range(args.seeds)]
    curves = Curves()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_population(cfg, settings, callbacks=[curves])
    out = []
    for k, (setting, arm, member) in enumerate(zip(settings, arms, result.members)):
        out.append({"optimizer": name, "lr": setting["optimizer.lr"], "seed": setting["seed"],
                    "order": arm, "diverged": member.diverged is not None,
                    "val_acc": [row[k].get("val_acc", float("nan")) for row in curves.rows],
                    "val_loss": [row[k].get("val_loss", float("nan")) for row in curves.rows]})
    print(f"{name}: {len(settings)} members in {result.seconds:.0f}s", flush=True)
    return out


def _summary(runs: list[dict], args) -> list[dict]:
    """Per optimizer, lr and order: the mean over seeds of the early val_acc (epochs 1..pace), the final and the
    best val_acc, the final val_loss; and the mean paired difference to shuffle (same seed) early and at the end."""
    rows = []
    keyed = {(r["optimizer"], r["lr"], r["order"], r["seed"]): r for r in runs}
    for name in args.optimizers:
        for lr in args.lrs[name]:
            for order in ORDERS:
                mine = [keyed[name, lr, order, s] for s in range(args.seeds)]
                base = [keyed[name, lr, "shuffle", s] for s in range(args.seeds)]
                early = [_early(r, args.pace) for r in mine]
                rows.append({"optimizer": name, "lr": lr, "order": order, "early_acc": _mean(early),
                             "final_acc": _mean([r["val_acc"][-1] for r in mine]),
                             "final_acc_sd": _sd([r["val_acc"][-1] for r in mine]),
                             "best_acc": _mean([max(r["val_acc"]) for r in mine]),
                             "final_loss": _mean([r["val_loss"][-1] for r in mine]),
                             "early_vs_shuffle": _mean([e - _early(b, args.pace) for e, b in zip(early, base)]),
                             "final_vs_shuffle": _mean([r["val_acc"][-1] - b["val_acc"][-1]
                                                        for r, b in zip(mine, base)]),
                             "final_wins": sum(r["val_acc"][-1] > b["val_acc"][-1] for r, b in zip(mine, base))})
    return rows


def _early(run: dict, pace: int) -> float:
    return float(np.mean(run["val_acc"][:pace]))


def _mean(xs) -> float:
    return float(np.mean(xs))


def _sd(xs) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _plot(runs: list[dict], args) -> None:
    """val_acc over the epochs, mean over seeds (band: min to max), one panel per optimizer and lr; the dotted line
    is the epoch from which the curriculum's pool is the whole training set."""
    cols = max(len(v) for v in args.lrs.values())
    fig, axes = figure(len(args.optimizers), cols, figsize=(4.6 * cols, 3.4 * len(args.optimizers)), dpi=100)
    epochs = np.arange(1, args.epochs + 1)
    for row, name in enumerate(args.optimizers):
        for col, lr in enumerate(args.lrs[name]):
            ax = axes[row][col]
            for order in ORDERS:
                accs = np.array([r["val_acc"] for r in runs
                                 if (r["optimizer"], r["lr"], r["order"]) == (name, lr, order)])
                ax.plot(epochs, accs.mean(0), color=COLOR[order], lw=1.4, label=order)
                ax.fill_between(epochs, accs.min(0), accs.max(0), color=COLOR[order], alpha=0.12, lw=0)
            ax.axvline(args.pace + 1, color="k", ls=":", lw=0.8)
            ax.set(xlabel="epoch", ylabel="val_acc", title=f"{name}, lr {lr:g} ({args.seeds} seeds)")
    axes[0][0].legend(fontsize=7)
    save(fig, args.out / "curriculum.png")
