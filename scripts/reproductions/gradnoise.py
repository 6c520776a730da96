"""Item: annealed gradient noise helps a deep, badly initialised MLP train (Neelakantan et al. 2015), at CPU size.

Config: ``data=digits`` (1,437 training images of 8x8, batches of 128) and ``model=mlp`` with 20 hidden layers of 50
ReLU units (``model.hidden=[50]*20``, the paper's depth and width) under two bad initialisations: ``model.init=normal``
(weights N(0, 0.1²), biases 0: the paper's "simple init"; each layer scales the signal by about sqrt(50·0.01/2) = 0.5,
so 0.5^20 ≈ 1e-6 reaches the output) and ``model.init=zero`` (every weight 0: only noise can break the symmetry).
``optimizer.grad_noise.eta`` in {0, 0.01, 0.3, 1.0} (the paper's η, γ = 0.55) x a few lrs x seeds, for SGD and Adam.
Each (optimizer, init) is one population (``train_population`` with explicit member settings: eta x lr x seed), whose
members each equal their standalone ``python train.py`` run, noise included (each member draws its own with its
seed). A seed is a paired comparison: the same initial weights and batches, only eta differs.

Writes ``gradnoise.json`` and ``gradnoise_deep_mlp.png`` (final val_acc against lr, one line per eta, per optimizer
and init, mean and range over seeds).
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics


from ._common import Curves, compose, figure, save, table, write_json

ETAS = (0.0, 0.01, 0.3, 1.0)
LRS = {"sgd": [0.01, 0.03, 0.1], "adam": [1e-4, 1e-3, 1e-2]}
INITS = ("normal", "zero")
COLOR = {0.0: "#000000", 0.01: "#1f77b4", 0.3: "#ff7f0e", 1.0: "#d62728"}


def defaults(a) -> None:
    """The document's sizes, or with --quick the tests'."""
    q = a.quick
    a.epochs = a.epochs or (1 if q else 30)
    a.seeds = a.seeds or (1 if q else 2)
    a.optimizers = ["adam"] if q else list(LRS)
    a.lrs = {name: LRS[name][1:2] if q else LRS[name] for name in a.optimizers}
    a.etas = [0.0, 1.0] if q else list(ETAS)
    a.inits = ["zero"] if q else list(INITS)
    a.depth = 20


def run(args) -> dict:
    runs = []
    for wait in (False, True):  # first train what no other process has claimed, then collect every population
        runs = []
        for name in args.optimizers:
            for init in args.inits:
                runs += _cached(name, init, args, wait)
    summary = _summary(runs, args)
    print(table(summary, ["optimizer", "init", "lr", "eta", "final_acc", "min_acc", "max_acc", "final_loss",
                          "gain_vs_no_noise", "seeds_better"]))
    _plot(runs, summary, args)
    data = {"settings": {"epochs": args.epochs, "seeds": args.seeds, "lrs": args.lrs, "etas": args.etas,
                         "gamma": 0.55, "inits": args.inits, "data": "digits (batch 128)",
                         "model": f"mlp [50] x {args.depth}, init normal (std 0.1, biases 0) or zero"},
            "summary": summary, "runs": runs}
    write_json(args.out, "gradnoise", data)
    return data


def _cached(name: str, init: str, args, wait: bool) -> list[dict]:
    """A population's runs, kept in ``<out>/gradnoise_parts/`` as soon as it finishes: a second process started on
    the same ``--out`` takes the populations no other has claimed (two use both cores), and a rerun after an
    interruption trains only what is missing. Waits for a population another process is training."""
    import hashlib
    import json
    import os
    import time

    # the sizes in the name: a rerun with other sizes (--quick, --epochs) does not take these runs for its own
    sizes = json.dumps([args.epochs, args.seeds, args.lrs[name], args.etas, args.depth])
    parts = args.out / "gradnoise_parts"
    parts.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{init}_{hashlib.sha1(sizes.encode()).hexdigest()[:8]}"
    done, claim = parts / f"{stem}.json", parts / f"{stem}.claim"
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        while wait and not done.exists():
            time.sleep(5)
        return json.loads(done.read_text()) if done.exists() else []
    out = _population(name, init, args)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(done)
    return out


def _population(name: str, init: str, args) -> list[dict]:
    """One population: every eta x lr x seed of optimizer ``name`` under ``init``."""
    from optstudy.population.run import train_population

    hidden = ",".join(["50"] * args.depth)
    cfg = compose("data=digits", "model=mlp", f"model.hidden=[{hidden}]", f"model.init={init}", "model.init_std=0.1",
                  f"optimizer={name}", f"trainer.max_epochs={args.epochs}", "optimizer.grad_noise.gamma=0.55",
                  "divergence.factor=null")  # a noisy start may spike the loss; only NaN/inf stops a member
    settings = [{"optimizer.grad_noise.eta": eta, "optimizer.lr": lr, "seed": seed}
                for eta in args.etas for lr in args.lrs[name] for seed in range(args.seeds)]
    curves = Curves()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_population(cfg, settings, callbacks=[curves])
    out = []
    for k, (setting, member) in enumerate(zip(settings, result.members)):
        out.append({"optimizer": name, "init": init, "eta": setting["optimizer.grad_noise.eta"],
                    "lr": setting["optimizer.lr"], "seed": setting["seed"], "diverged": member.diverged is not None,
                    "val_acc": [row[k].get("val_acc", float("nan")) for row in curves.rows],
                    "val_loss": [row[k].get("val_loss", float("nan")) for row in curves.rows]})
    means = {eta: statistics.fmean(_final(r) for r in out if r["eta"] == eta) for eta in args.etas}
    print(f"{name} init={init}: {len(settings)} members in {result.seconds:.0f}s; mean final val_acc by eta: "
          + ", ".join(f"{eta:g}: {acc:.3f}" for eta, acc in means.items()), flush=True)
    return out


def _final(run: dict, key: str = "val_acc") -> float:
    """The last epoch's value; a diverged member counts as chance (val_acc 0.1) and an infinite loss."""
    if run["diverged"] or not run[key] or not math.isfinite(run[key][-1]):
        return 0.1 if key == "val_acc" else float("inf")
    return run[key][-1]


def _summary(runs: list[dict], args) -> list[dict]:
    """Per optimizer, init, lr and eta: final val_acc (mean, min, max over seeds), final val_loss (mean), the gain in
    mean val_acc over eta 0 at the same lr, and in how many seeds the noisy run beats its paired noiseless one."""
    rows = []
    for name in args.optimizers:
        for init in args.inits:
            for lr in args.lrs[name]:
                base = {r["seed"]: _final(r) for r in runs
                        if (r["optimizer"], r["init"], r["lr"], r["eta"]) == (name, init, lr, 0.0)}
                for eta in args.etas:
                    mine = [r for r in runs if (r["optimizer"], r["init"], r["lr"], r["eta"]) == (name, init, lr, eta)]
                    accs = [_final(r) for r in mine]
                    rows.append({"optimizer": name, "init": init, "lr": lr, "eta": eta,
                                 "final_acc": statistics.fmean(accs), "min_acc": min(accs), "max_acc": max(accs),
                                 "final_loss": statistics.fmean(_final(r, "val_loss") for r in mine),
                                 "gain_vs_no_noise": statistics.fmean(accs) - statistics.fmean(base.values()),
                                 "seeds_better": f"{sum(_final(r) > base[r['seed']] for r in mine)}/{len(mine)}"})
    return rows


def _plot(runs: list[dict], summary: list[dict], args) -> None:
    """Final val_acc against lr, one line per eta (mean over seeds, bars: min to max); a panel per optimizer and
    init. Below, val_acc over the epochs at each optimizer's middle lr."""
    panels = [(name, init) for name in args.optimizers for init in args.inits]
    fig, axes = figure(2, len(panels), figsize=(3.6 * len(panels), 6.4), dpi=100)
    for col, (name, init) in enumerate(panels):
        ax = axes[0][col]
        for eta in args.etas:
            rows = [r for r in summary if (r["optimizer"], r["init"], r["eta"]) == (name, init, eta)]
            lrs = [r["lr"] for r in rows]
            mean = [r["final_acc"] for r in rows]
            err = [[m - r["min_acc"] for m, r in zip(mean, rows)], [r["max_acc"] - m for m, r in zip(mean, rows)]]
            ax.errorbar(lrs, mean, yerr=err, fmt="o-", ms=3, capsize=2, color=COLOR.get(eta), label=f"η={eta:g}")
        ax.set(xscale="log", ylim=(0, 1), xlabel="lr", ylabel=f"val_acc after {args.epochs} epochs",
               title=f"{name}, init {init}")
        ax = axes[1][col]
        lr = args.lrs[name][len(args.lrs[name]) // 2]
        for eta in args.etas:
            mine = [r for r in runs if (r["optimizer"], r["init"], r["lr"], r["eta"]) == (name, init, lr, eta)]
            for i, r in enumerate(mine):
                ax.plot(range(1, len(r["val_acc"]) + 1), r["val_acc"], color=COLOR.get(eta), lw=1,
                        label=f"η={eta:g}" if i == 0 else None)
        ax.set(ylim=(0, 1), xlabel="epoch", ylabel="val_acc", title=f"{name} lr {lr:g}, init {init}: each seed")
    axes[0][0].legend(fontsize=7)
    save(fig, args.out / "gradnoise_deep_mlp.png")
