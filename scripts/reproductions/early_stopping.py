"""Item: epochs saved by early stopping at equal final quality, per optimizer (Ruder 2016, Sec. 6.3).

Config: ``conf/experiment/mnist1d_mlp.yaml`` (MNIST-1D, an MLP of two 100-unit layers, batches of 128, 50 epochs; it
overfits: val_loss rises after its minimum) for five optimizers at three lrs around their good values and three
seeds. Each optimizer is trained twice as one population (``train_population``: lrs x seeds): once to the budget,
once with ``trainer.early_stopping.patience=P`` (monitor: the objective, val_loss; each member stops on its own and
is cut from the stack). A member's run with early stopping is its full run cut at the stop (tests/
test_early_stopping.py), so a seed is a paired comparison: the val_acc and val_loss it ends with, stopped or not.

Other patiences, and monitoring val_acc instead (mode max), are read off the full runs' curves with the same rule
(``reference_stop``: Lightning's, float32); the run with patience P checks that reading: every member's stop epoch
must equal the rule's on its full curve. Compute is counted in stack rows x epochs (``row_epochs``): what the
population trained, stopped members cut out as ``COMPACT_AT`` allows; wall seconds are printed too, but at this size
a step's fixed costs dominate them.

Writes ``early_stopping.json`` and ``early_stopping.png``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from ._common import COLORS, Curves, compose, figure, save, table, write_json

LRS = {"sgd": [0.03, 0.1, 0.3], "momentum": [0.01, 0.03, 0.1], "adam": [3e-4, 1e-3, 3e-3],
       "rmsprop": [1e-4, 3e-4, 1e-3], "adagrad": [3e-3, 1e-2, 3e-2]}
PATIENCES = (2, 3, 5, 10, 20)
EQUAL = 0.01  # val_acc: "equal final quality" means the early-stopped run ends within 1 point of the full run


def defaults(a) -> None:
    """The document's sizes, or with --quick the tests'."""
    q = a.quick
    a.epochs = a.epochs or (8 if q else 50)
    a.seeds = a.seeds or (1 if q else 3)
    a.optimizers = ["adam"] if q else list(LRS)
    a.lrs = {name: [3e-2] if q else LRS[name] for name in a.optimizers}  # quick: overfits at once
    a.patience = 1 if q else 5
    a.patiences = (1, 2) if q else PATIENCES
    a.num_samples = 1000 if q else 5000


def reference_stop(values: list[float], patience: int, mode: str = "min") -> tuple[int | None, int]:
    """Lightning's rule (min_delta 0, float32) on a curve: (epochs run when it stops, else None; the best epoch),
    epochs from 1."""
    sign = np.float32(1.0 if mode == "min" else -1.0)
    best, best_epoch, wait = np.float32(np.inf), 0, 0
    for epoch, v in enumerate(values, start=1):
        if sign * np.float32(v) < best:
            best, best_epoch, wait = sign * np.float32(v), epoch, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch, best_epoch
    return None, best_epoch


def run(args) -> dict:
    runs, costs = [], {}
    for name in args.optimizers:
        full, stopped, costs[name] = _pair(name, args)
        runs += _join(name, full, stopped, args)
    agree = sum(r["es_epochs"] == r["rule_epochs"] for r in runs)
    print(f"stop epochs equal to the rule on the full curves: {agree}/{len(runs)}")
    best = _best_rows(runs, args, costs)
    print(table(best, ["optimizer", "lr", "stopped", "epochs_run", "saved_share", "acc_full", "acc_es", "d_acc",
                       "loss_full", "loss_es", "equal", "compute_share", "seconds_full", "seconds_es"]))
    sweep = _sweep(runs, args)
    everything = _all_rows(runs, args)
    print(table(everything, ["optimizer", "lr", "stopped", "epochs_run", "d_acc", "d_loss", "equal"]))
    _plot(runs, best, sweep, args)
    data = {"settings": {"epochs": args.epochs, "seeds": args.seeds, "lrs": args.lrs, "patience": args.patience,
                         "patiences": list(args.patiences), "monitor": "val_loss", "min_delta": 0.0,
                         "data": f"mnist1d num_samples={args.num_samples}", "model": "mlp [100, 100]",
                         "equal": f"|val_acc(early stopped) - val_acc(full)| <= {EQUAL}, mean over seeds"},
            "agreement": {"equal_to_rule": agree, "members": len(runs)},
            "best": best, "configurations": everything, "patience_sweep": sweep,
            "runs": [{k: v for k, v in r.items() if k not in ("val_acc", "val_loss")} for r in runs]}
    write_json(args.out, "early_stopping", data)
    return data


def _pair(name: str, args) -> tuple:
    """Optimizer ``name``'s lrs x seeds as one population, to the budget (with every epoch's metrics) and with
    early stopping; and their cost: wall seconds and stack rows x epochs (``row_epochs``)."""
    from optstudy.population.run import train_population

    base = ["experiment=mnist1d_mlp", f"optimizer={name}", f"trainer.max_epochs={args.epochs}",
            f"data.num_samples={args.num_samples}"]
    settings = [{"optimizer.lr": lr, "seed": seed} for lr in args.lrs[name] for seed in range(args.seeds)]
    curves = Curves()
    with contextlib.redirect_stdout(io.StringIO()):
        full = train_population(compose(*base), settings, callbacks=[curves])
        stopped = train_population(compose(*base, f"trainer.early_stopping.patience={args.patience}"), settings)
    print(f"{name}: {len(settings)} members, {full.seconds:.0f}s to the budget, {stopped.seconds:.0f}s with early "
          f"stopping (stack cut at {[rows for _, rows in stopped.compactions]})", flush=True)
    cost = {"seconds_full": full.seconds, "seconds_es": stopped.seconds,
            "row_epochs_full": len(settings) * args.epochs, "row_epochs_es": row_epochs(stopped, len(settings))}
    return (settings, full, curves), stopped, cost


def row_epochs(result, k: int) -> int:
    """The compute a population spent, in stack rows x epochs: ``k`` rows until the first cut, then the rows each cut
    left (``PopulationResult.compactions``: (epoch from 0, rows left) at that epoch's end), until the last member
    stopped. A stopped member still costs until a quarter of the stack has stopped (``COMPACT_AT``)."""
    last = max(int(m.metrics.get("early_stopping/epochs_run", 0)) for m in result.members)
    cuts, rows, total = dict(result.compactions), k, 0
    for epoch in range(last):
        total += rows
        rows = cuts.get(epoch, rows)
    return total


def _join(name: str, full, stopped, args) -> list[dict]:
    settings, result, curves = full
    out = []
    for k, setting in enumerate(settings):
        acc = [row[k].get("val_acc", float("nan")) for row in curves.rows]
        loss = [row[k].get("val_loss", float("nan")) for row in curves.rows]
        member = stopped.members[k]
        rule, best_epoch = reference_stop(loss, args.patience)
        out.append({"optimizer": name, "lr": setting["optimizer.lr"], "seed": setting["seed"],
                    "diverged": result.members[k].diverged is not None or member.diverged is not None,
                    "es_epochs": int(member.metrics.get("early_stopping/epochs_run", 0)),
                    "es_stopped": bool(member.metrics.get("early_stopping/stopped", 0)),
                    "rule_epochs": rule or args.epochs, "best_epoch": best_epoch,
                    "acc_es": member.metrics.get("val_acc", float("nan")),
                    "loss_es": member.metrics.get("val_loss", float("nan")),
                    "acc_full": acc[-1], "loss_full": loss[-1], "val_acc": acc, "val_loss": loss,
                    # the full run's values at the early stop: the early-stopped member's, if it is that run cut there
                    "acc_full_at_stop": acc[max(int(member.metrics.get("early_stopping/epochs_run", 1)), 1) - 1]})
    return out


def _summary(mine: list[dict], args) -> dict:
    """Mean over seeds: epochs run, the share of the budget saved, val_acc and val_loss at the end with and without
    early stopping, their paired differences."""
    d_acc = float(np.mean([r["acc_es"] - r["acc_full"] for r in mine]))
    return {"stopped": sum(r["es_stopped"] for r in mine), "runs": len(mine),
            "epochs_run": float(np.mean([r["es_epochs"] for r in mine])),
            "saved_share": float(np.mean([1 - r["es_epochs"] / args.epochs for r in mine])),
            "acc_full": float(np.mean([r["acc_full"] for r in mine])),
            "acc_es": float(np.mean([r["acc_es"] for r in mine])), "d_acc": d_acc,
            "loss_full": float(np.mean([r["loss_full"] for r in mine])),
            "loss_es": float(np.mean([r["loss_es"] for r in mine])),
            "d_loss": float(np.mean([r["loss_es"] - r["loss_full"] for r in mine])),
            "equal": abs(d_acc) <= EQUAL}


def _configs(runs: list[dict], name: str, lr: float) -> list[dict]:
    return [r for r in runs if r["optimizer"] == name and r["lr"] == lr and not r["diverged"]]


def _best_lr(runs: list[dict], name: str, args) -> float:
    """The lr whose full runs end with the best mean val_acc (what one would pick without early stopping)."""
    return max(args.lrs[name], key=lambda lr: np.mean([r["acc_full"] for r in _configs(runs, name, lr)] or [-1]))


def _best_rows(runs, args, costs) -> list[dict]:
    rows = []
    for name in args.optimizers:
        lr = _best_lr(runs, name, args)
        cost = costs[name]  # of the optimizer's whole population (every lr), not of the best lr alone
        rows.append({"optimizer": name, "lr": lr, **_summary(_configs(runs, name, lr), args), **cost,
                     "compute_share": cost["row_epochs_es"] / cost["row_epochs_full"]})
    return rows


def _all_rows(runs, args) -> list[dict]:
    return [{"optimizer": name, "lr": lr, **_summary(_configs(runs, name, lr), args)}
            for name in args.optimizers for lr in args.lrs[name] if _configs(runs, name, lr)]


def _sweep(runs, args) -> list[dict]:
    """Each optimizer's best lr at other patiences, monitoring val_loss (the default: the objective) or val_acc (mode
    max), read off the full curves with the same rule: epochs run, and val_acc and val_loss at the stop against the
    full run's."""
    rows = []
    for name in args.optimizers:
        mine = _configs(runs, name, _best_lr(runs, name, args))
        for monitor, mode in (("val_loss", "min"), ("val_acc", "max")):
            for p in args.patiences:
                stops = [reference_stop(r[monitor], p, mode)[0] or args.epochs for r in mine]
                at = list(zip(mine, stops))
                rows.append({"optimizer": name, "monitor": monitor, "patience": p,
                             "epochs_run": float(np.mean(stops)),
                             "saved_share": float(np.mean([1 - s / args.epochs for s in stops])),
                             "d_acc": float(np.mean([r["val_acc"][s - 1] - r["acc_full"] for r, s in at])),
                             "d_loss": float(np.mean([r["val_loss"][s - 1] - r["loss_full"] for r, s in at]))})
    return rows


def _plot(runs, best, sweep, args) -> None:
    """(a) val_acc over the epochs at each optimizer's best lr (mean over seeds), the early stops marked; (b) epochs
    run with early stopping against the budget, with the val_acc difference; (c) patience: epochs saved against the
    val_acc given up."""
    fig, axes = figure(1, 3, figsize=(16, 4.8), dpi=100)
    a, b, c = axes[0]
    for i, row in enumerate(best):
        color = COLORS[i % len(COLORS)]
        mine = _configs(runs, row["optimizer"], row["lr"])
        mean = np.mean([r["val_acc"] for r in mine], axis=0)
        a.plot(np.arange(1, len(mean) + 1), mean, color=color, lw=1.5, label=f"{row['optimizer']} lr={row['lr']:g}")
        for r in mine:
            a.plot(r["es_epochs"], r["acc_es"], "o", color=color, ms=5, mec="k", mew=0.5)
    a.set(xlabel="epoch", ylabel="val_acc", title=f"val_acc at the best lr, mean over {args.seeds} seeds\n"
          f"dots: each seed's early stop (patience {args.patience})")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    names = [r["optimizer"] for r in best]
    y = np.arange(len(best))
    colors = [COLORS[i % len(COLORS)] for i in range(len(best))]
    b.barh(y, [r["epochs_run"] for r in best], color=colors)
    b.barh(y, [args.epochs - r["epochs_run"] for r in best], left=[r["epochs_run"] for r in best], color=colors,
           alpha=0.25)
    for i, r in enumerate(best):
        b.text(args.epochs, i, f" {r['saved_share']:.0%} saved, Δacc {r['d_acc']:+.3f}", va="center", fontsize=8)
    b.set(yticks=y, yticklabels=names, xlim=(0, args.epochs * 1.7), xlabel="epochs (light: saved)",
          title=f"epochs run with early stopping (patience {args.patience})\nbest lr, mean over seeds")
    b.invert_yaxis()
    for i, name in enumerate(names):
        for monitor, style in (("val_loss", "o-"), ("val_acc", "s--")):
            rows = [r for r in sweep if r["optimizer"] == name and r["monitor"] == monitor]
            c.plot([r["saved_share"] for r in rows], [r["d_acc"] for r in rows], style, color=colors[i], ms=4,
                   label=name if monitor == "val_loss" else None)
            for r in rows:
                c.annotate(str(r["patience"]), (r["saved_share"], r["d_acc"]), fontsize=7, xytext=(3, 3),
                           textcoords="offset points")
    c.axhspan(-EQUAL, EQUAL, color="0.85", zorder=0, label=f"equal (±{EQUAL})")
    c.set(xlabel="share of the budget saved", ylabel="val_acc at the stop − at the budget",
          title="patience (numbers), best lr: saved vs given up\nmonitor val_loss (solid) or val_acc (dashed)")
    c.grid(alpha=0.3)
    c.legend(fontsize=8)
    save(fig, args.out / "early_stopping.png")
