"""Item: tolerance to stale gradients (McMahan & Streeter 2014, the delay-tolerant claim), at CPU size.

Config: digits with ``data.batch_size=32`` (45 steps an epoch, 10 epochs) and ``trainer.delay=τ`` for τ in 0, 1, 2,
4, 8, 16, 32, 64 (``optstudy.delay``: every gradient applied τ steps after it was computed, exactly, in one process),
on two problems: ``experiment=digits_mlp`` (an MLP of two 100-unit layers; seven optimizers) and ``model=logreg``
(convex, the paper's setting: SGD, AdaGrad, Adam). Per optimizer a population of four lrs around its good value on the
problem (``PROBLEMS``) x seeds; each (problem, optimizer, τ) is one population (``train_population``; the delay is
shared by its members), whose members each equal their standalone ``python train.py`` run. A member whose loss blows
up (``divergence.factor``, 100x its first loss) is recorded as diverged.

Reported per optimizer and τ, mean over seeds of the final val_loss: at the lr that is best without delay (the
optimizer "at its good default"), and at the best lr of the grid for that τ (tuned for the delay). Writes
``staleness.json`` and ``staleness.png``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np

from ._common import COLORS, compose, figure, save, table, write_json

# per problem: its overrides and the middle of each optimizer's lr grid, a good lr there (item 3's digits study found
# 0.01 for Adam, 0.03 for AdaBound and 0.3 for momentum at batch 128; smaller batches want smaller lrs; logreg's from
# a 4-lr check without delay), spread over 1.5 decades around it
PROBLEMS = {
    "mlp": {"overrides": ["experiment=digits_mlp"],
            "good": {"sgd": 0.3, "momentum": 0.1, "adagrad": 0.03, "rmsprop": 1e-3, "adam": 3e-3, "amsgrad": 3e-3,
                     "adabound": 0.01}},
    "logreg": {"overrides": ["model=logreg"],
               "good": {"sgd": 1.0, "adagrad": 0.3, "adam": 0.03}},
}
TAUS = (0, 1, 2, 4, 8, 16, 32, 64)
TOLERANCE = 1.25  # "tolerates τ": mean val_loss at most this times the undelayed one, no seed diverged


def defaults(a) -> None:
    """The document's sizes, or with --quick the tests'."""
    q = a.quick
    a.epochs = a.epochs or (2 if q else 10)
    a.seeds = a.seeds or (1 if q else 2)
    a.taus = (0, 8) if q else TAUS
    chosen = {"mlp": ["sgd", "adagrad"], "logreg": ["adagrad"]} if q else {p: list(v["good"]) for p, v in
                                                                             PROBLEMS.items()}
    a.lrs = {p: {n: [PROBLEMS[p]["good"][n]] if q else [g / 10, g / 3, g, g * 3]
                 for n in names for g in [PROBLEMS[p]["good"][n]]} for p, names in chosen.items()}


def run(args) -> dict:
    problems = {}
    for problem, lrs in args.lrs.items():
        runs = [r for name in lrs for tau in args.taus for r in _population(problem, name, tau, args)]
        summary = _summary(runs, lrs, args)
        print(f"--- {problem}")
        print(table(summary, ["optimizer", "tau", "default_lr", "at_default", "ratio_default", "best_lr", "at_best",
                              "ratio_best", "diverged"]))
        tolerated = _tolerated(summary, lrs)
        print(table(tolerated, ["optimizer", "default_lr", "tolerates_at_default", "tolerates_tuned"]))
        problems[problem] = {"overrides": PROBLEMS[problem]["overrides"], "lrs": lrs, "summary": summary,
                             "tolerated": tolerated, "runs": runs}
    _plot(problems, args)
    data = {"settings": {"epochs": args.epochs, "seeds": args.seeds, "taus": list(args.taus), "steps_per_epoch": 45,
                         "data": "digits, batch 32",
                         "tolerance": f"mean final val_loss <= {TOLERANCE} x the undelayed one, no seed diverged"},
            "problems": problems}
    write_json(args.out, "staleness", data)
    return data


def _population(problem: str, name: str, tau: int, args) -> list[dict]:
    """Optimizer ``name`` with delay ``tau`` on ``problem``: every lr x seed as one population. With ``--workdir``,
    each population's members are kept there and read back by a rerun with the same sizes (an interrupted sweep
    resumes)."""
    from optstudy.population.run import train_population

    sizes = {"epochs": args.epochs, "seeds": args.seeds, "lrs": args.lrs[problem][name]}
    kept = args.workdir / "staleness" / f"{problem}-{name}-tau{tau}.json" if getattr(args, "workdir", None) else None
    if kept is not None and kept.is_file() and json.loads(kept.read_text())["sizes"] == sizes:
        return json.loads(kept.read_text())["runs"]
    cfg = compose(*PROBLEMS[problem]["overrides"], f"optimizer={name}", "data.batch_size=32",
                  f"trainer.max_epochs={args.epochs}", f"trainer.delay={tau}")
    settings = [{"optimizer.lr": lr, "seed": seed} for lr in sizes["lrs"] for seed in range(args.seeds)]
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_population(cfg, settings)
    out = []
    for setting, member in zip(settings, result.members):
        out.append({"optimizer": name, "tau": tau, "lr": setting["optimizer.lr"], "seed": setting["seed"],
                    "diverged": member.diverged is not None,
                    "val_loss": float("inf") if member.diverged else member.metrics.get("val_loss", float("nan")),
                    "val_acc": member.metrics.get("val_acc", float("nan"))})
    print(f"{problem} {name} tau={tau}: {len(settings)} members in {result.seconds:.0f}s, "
          f"{sum(r['diverged'] for r in out)} diverged", flush=True)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"sizes": sizes, "runs": out}))
    return out


def _mean_loss(runs: list[dict], name: str, tau: int, lr: float) -> float:
    """Mean final val_loss over seeds; inf if any seed diverged."""
    values = [r["val_loss"] for r in runs if (r["optimizer"], r["tau"], r["lr"]) == (name, tau, lr)]
    return float(np.mean(values)) if all(math.isfinite(v) for v in values) else float("inf")


def _summary(runs: list[dict], grid: dict, args) -> list[dict]:
    rows = []
    for name, lrs in grid.items():
        base = {lr: _mean_loss(runs, name, args.taus[0], lr) for lr in lrs}
        default = min(lrs, key=lambda lr: base[lr])  # the lr that is best without delay
        for tau in args.taus:
            losses = {lr: _mean_loss(runs, name, tau, lr) for lr in lrs}
            best = min(lrs, key=lambda lr: losses[lr])
            rows.append({"optimizer": name, "tau": tau, "default_lr": default, "at_default": losses[default],
                         "ratio_default": losses[default] / base[default], "best_lr": best, "at_best": losses[best],
                         "ratio_best": losses[best] / min(base.values()),
                         "diverged": f"{sum(r['diverged'] for r in runs if (r['optimizer'], r['tau']) == (name, tau))}"
                                     f"/{len(lrs) * args.seeds}"})
    return rows


def _tolerated(summary: list[dict], grid: dict) -> list[dict]:
    """The largest τ up to which every τ of the sweep is within ``TOLERANCE`` of the undelayed run."""
    out = []
    for name in grid:
        rows = [r for r in summary if r["optimizer"] == name]
        out.append({"optimizer": name, "default_lr": rows[0]["default_lr"],
                    "tolerates_at_default": _largest(rows, "ratio_default"),
                    "tolerates_tuned": _largest(rows, "ratio_best")})
    return out


def _largest(rows: list[dict], key: str) -> int:
    tolerated = 0
    for r in rows:
        if not r[key] <= TOLERANCE:
            break
        tolerated = r["tau"]
    return tolerated


def _plot(problems: dict, args) -> None:
    """Final val_loss against τ (0 drawn at the left, the rest on log2), one row per problem: at the undelayed best lr
    and tuned per τ; a diverged point as an x at the top."""
    fig, axes = figure(len(problems), 2, figsize=(11, 4.2 * len(problems)), dpi=100)
    xs = {tau: (tau if tau else 0.5) for tau in args.taus}
    for row, (problem, found) in enumerate(problems.items()):
        summary = found["summary"]
        finite = [r[k] for r in summary for k in ("at_default", "at_best") if math.isfinite(r[k])]
        top = max(finite) * 1.5 if finite else 1.0
        for ax, key, title in ((axes[row][0], "at_default", "at the lr best without delay"),
                               (axes[row][1], "at_best", "at the best lr of the grid for each τ")):
            for name in found["lrs"]:
                color = COLORS[list(PROBLEMS["mlp"]["good"]).index(name)]  # one colour per optimizer in both rows
                rows = [r for r in summary if r["optimizer"] == name]
                x = [xs[r["tau"]] for r in rows]
                y = [r[key] if math.isfinite(r[key]) else np.nan for r in rows]
                ax.plot(x, y, "o-", color=color, ms=4, label=name)
                gone = [xs[r["tau"]] for r in rows if not math.isfinite(r[key])]
                ax.plot(gone, [top] * len(gone), "x", color=color, ms=8)
            ax.set(xscale="log", yscale="log", xlabel="delay τ (steps; 0 drawn at 0.5)", ylabel="final val_loss",
                   title=f"{problem}: {title}")
            ax.set_xticks([xs[t] for t in args.taus], [str(t) for t in args.taus])
            ax.axhline(top, color="#cccccc", lw=0.5)
        axes[row][0].legend(fontsize=8)
    save(fig, args.out / "staleness.png")
