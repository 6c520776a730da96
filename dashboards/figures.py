"""The figures of the sensitivity report and of the live dashboard: one function per view, drawn with matplotlib's
object API (no pyplot state, so the dashboard's threads can draw at once) and returned as PNG bytes. The static report
embeds them as data URIs (``html.img``); the dashboard serves the same bytes (``app``), so both show the same picture.

Each optimizer keeps one colour across figures (``colors``).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

DPI = 90


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def colors(optimizers: list[str]) -> dict[str, str]:
    return {o: f"C{i % 10}" for i, o in enumerate(optimizers)}


def hyperparameters(optimizer: str, seeds: pd.DataFrame, configs: pd.DataFrame, params: list[str],
                    kinds: dict[str, tuple[bool, bool]], objective: str, color: str) -> bytes:
    """One panel per hyperparameter: every seed's value (dots) and each configuration's mean (marker) with its
    min-max over seeds (bar). ``kinds[name]`` = (log axis, categorical)."""
    cols = min(len(params), 3)
    rows = -(-len(params) // cols)
    fig = Figure(figsize=(max(4.6 * cols, 6.0), 3.4 * rows), layout="constrained")
    for i, name in enumerate(params):
        ax = fig.add_subplot(rows, cols, i + 1)
        log, categorical = kinds[name]
        _param_panel(ax, seeds, configs, f"params_{name}", log, categorical, color)
        ax.set(xlabel=name, ylabel=objective if i % cols == 0 else None)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{optimizer}: seeds (dots), mean and min-max per configuration")
    return png(fig)


def _param_panel(ax, seeds, configs, column, log, categorical, color):
    mine = configs[configs[column].notna()]
    dots = seeds[seeds[column].notna()]
    if categorical:
        labels = sorted({str(v) for v in mine[column]})
        where = {v: j for j, v in enumerate(labels)}
        x_conf, x_seed = mine[column].astype(str).map(where), dots[column].astype(str).map(where)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    else:
        x_conf, x_seed = mine[column].astype(float), dots[column].astype(float)
        if log:
            ax.set_xscale("log")
    ax.scatter(x_seed, dots["value"], s=12, color=color, alpha=0.35, lw=0)
    yerr = np.vstack([mine["mean"] - mine["min"], mine["max"] - mine["mean"]])
    ax.errorbar(x_conf, mine["mean"], yerr=yerr, fmt="o", color=color, ms=5, capsize=3, lw=1)


def lr_sensitivity(curve: pd.DataFrame, objective: str, color: dict[str, str], points: pd.DataFrame | None = None,
                   diverged: pd.DataFrame | None = None) -> bytes:
    """DeepOBS' learning-rate sensitivity: per optimizer, the best mean objective at each lr (or lr bin), band
    min-max; ``points``: every configuration's mean (optimizer, lr, mean), drawn as dots under the lines;
    ``diverged``: (optimizer, lr) of trials that diverged, as crosses on the top edge (they have no value)."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if diverged is not None and len(diverged):
        edge = ax.get_xaxis_transform()  # x in data, y in axes fractions
        for optimizer, rows in diverged.groupby("optimizer", sort=False):
            ax.plot(rows["lr"], [0.97] * len(rows), "x", ms=8, mew=2, color=color.get(optimizer, "k"),
                    transform=edge, clip_on=False, label=f"{optimizer} diverged")
    if points is not None:
        for optimizer, rows in points.dropna(subset=["lr"]).groupby("optimizer", sort=False):
            ax.scatter(rows["lr"], rows["mean"], s=9, alpha=0.35, color=color.get(optimizer, "k"), lw=0)
    for optimizer, rows in curve.groupby("optimizer", sort=False):
        rows = rows.sort_values("lr")
        c = color.get(optimizer, "k")
        ax.plot(rows["lr"], rows["mean"], "o-", color=c, ms=4, label=optimizer)
        ax.fill_between(rows["lr"], rows["min"], rows["max"], color=c, alpha=0.18, lw=0)
        if len(rows) == 1:  # a band needs two points: show the spread as a bar
            ax.errorbar(rows["lr"], rows["mean"], yerr=[rows["mean"] - rows["min"], rows["max"] - rows["mean"]],
                        color=c, capsize=3)
    at = "each lr" if points is None else "each lr bin"
    title = "learning-rate sensitivity: mean over seeds, band min-max" + ("" if points is None else
                                                                          "; dots: every configuration")
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"{objective} (best configuration at {at})", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return png(fig)


def importance_bars(table: pd.DataFrame) -> bytes:
    scopes = list(dict.fromkeys(table["scope"]))
    fig = Figure(figsize=(4.2 * len(scopes), 0.5 + 0.45 * table.groupby("scope").size().max() + 1),
                 layout="constrained")
    for i, scope in enumerate(scopes):
        rows = table[table["scope"] == scope].sort_values("importance")
        ax = fig.add_subplot(1, len(scopes), i + 1)
        ax.barh(rows["param"], rows["importance"], color="C0")
        ax.set(xlim=(0, 1), xlabel="importance (fANOVA, normalized)", title=scope)
    return png(fig)


def learning_curves(curves: dict[str, pd.DataFrame], objective: str, color: dict[str, str],
                    title: str = "best configuration of each optimizer: mean over seeds, band min-max") -> bytes:
    """One line per entry of ``curves`` (label -> step, mean, min, max), band min-max; a label that is not an
    optimizer (a chosen trial, ``"trial 7 (adam)"``) takes its optimizer's colour when ``color`` has the label."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for optimizer, table in curves.items():
        c = color.get(optimizer, "k")
        ax.plot(table["step"], table["mean"], "o-", ms=3, color=c, label=optimizer)
        ax.fill_between(table["step"], table["min"], table["max"], color=c, alpha=0.18, lw=0)
    ax.set(xlabel="optimizer step", ylabel=objective, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def heatmap(arrays: dict, title: str) -> bytes:
    """``optstudy.lrlog.heatmap`` (the run's own artifact picture, AdaBound's bounds drawn), as PNG bytes."""
    from optstudy import lrlog  # here: it imports Lightning (seconds), which the other views do not need

    with tempfile.TemporaryDirectory() as tmp:
        return lrlog.heatmap(arrays, Path(tmp) / "heatmap.png", title).read_bytes()


def final_distributions(tables: dict[str, pd.DataFrame], color: dict[str, str]) -> bytes:
    """The last record's distribution of log10 effective lr of each optimizer's best run, overlaid."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    used = []
    for optimizer, t in tables.items():
        ax.stairs(t["fraction"], np.append(t["log10_lr_low"], t["log10_lr_high"].iloc[-1]),
                  color=color.get(optimizer, "k"), lw=1.5, label=f"{optimizer} (step {t['step'].iloc[0]})")
        used += list(t.loc[t["fraction"] > 0, "log10_lr_low"]) + list(t.loc[t["fraction"] > 0, "log10_lr_high"])
    if used:
        ax.set_xlim(min(used) - 0.5, max(used) + 0.5)
    ax.set(xlabel="log10 effective learning rate", ylabel="fraction of elements",
           title="effective learning rates at the last record")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def pairs(optimizer: str, configs: pd.DataFrame, others: list[str], kinds: dict[str, tuple[bool, bool]],
          objective: str, sign: float) -> bytes:
    """The 2-D views: lr (x) against each other hyperparameter of ``others`` (y: β1, momentum, final_lr, γ, a bound
    schedule's parameter, the schedule itself), one dot per configuration coloured by its mean objective over seeds
    (one colour scale for the figure, the best end dark), the best configuration starred. Where the good lr moves
    with the other parameter, the dark band leans; a vertical band means the two do not interact."""
    cols = min(len(others), 3)
    rows = -(-len(others) // cols)
    fig = Figure(figsize=(max(4.6 * cols, 6.0), 3.6 * rows), layout="constrained")
    means = configs["mean"].astype(float)
    finite = means[np.isfinite(means)]
    vmin, vmax = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    cmap = "viridis" if sign > 0 else "viridis_r"  # dark = good in both directions
    best = configs.iloc[int(np.argmin(sign * means.to_numpy()))] if len(finite) else None
    for i, name in enumerate(others):
        ax = fig.add_subplot(rows, cols, i + 1)
        column = f"params_{name}"
        mine = configs[configs[column].notna() & configs["params_lr"].notna()]
        log, categorical = kinds.get(name, (False, False))
        y = mine[column]
        if categorical:
            labels = sorted({str(v) for v in y})
            y = y.astype(str).map({v: j for j, v in enumerate(labels)})
            ax.set_yticks(range(len(labels)), labels)
        elif log:
            ax.set_yscale("log")
        dots = ax.scatter(mine["params_lr"].astype(float), y.astype(float), c=mine["mean"].astype(float), s=36,
                          cmap=cmap, vmin=vmin, vmax=vmax, edgecolors="none")
        if best is not None and pd.notna(best.get(column)):
            by = {str(v): j for j, v in enumerate(sorted({str(v) for v in mine[column]}))}.get(str(best[column])) \
                if categorical else best[column]
            ax.plot(best["params_lr"], by, "*", ms=16, mfc="none", mec="crimson", mew=1.5, label="best")
            ax.legend(loc="best", fontsize=8)
        ax.set(xscale="log", xlabel="lr", ylabel=name)
        ax.grid(alpha=0.3, which="both")
    fig.colorbar(dots, ax=fig.axes, label=f"{objective} (mean over seeds)", shrink=0.9)
    fig.suptitle(f"{optimizer}: lr × {', '.join(others)}; a dot per configuration", fontsize=10)
    return png(fig)


def bound_schedules(schedules: dict[str, tuple[float, object]], steps: int, color: dict[str, str]) -> bytes:
    """AdaBound's clip range over training: for each entry (label -> (final_lr, schedule), a schedule of
    ``optstudy.optim.bounds``), the lower bound ``final_lr·lower(t)`` (dashed) and the upper bound
    ``final_lr·upper(t)`` (dotted) on the per-element step size, t = 1 .. ``steps``, on log axes; both close on
    final_lr (thin line), where the optimizer becomes SGD."""
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    t = np.unique(np.geomspace(1, max(int(steps), 2), 400).round())
    for i, (label, (final_lr, schedule)) in enumerate(schedules.items()):
        c = color.get(label, f"C{i % 10}")
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            lower, upper = final_lr * np.asarray(schedule.lower(t), float), final_lr * np.asarray(schedule.upper(t), float)
        lower, upper = np.where(lower > 0, lower, np.nan), np.where(np.isfinite(upper), upper, np.nan)
        ax.plot(t, lower, "--", color=c, lw=1.5, label=f"{label}: lower")
        ax.plot(t, upper, ":", color=c, lw=1.8, label=f"{label}: upper")
        ax.axhline(final_lr, color=c, lw=0.6, alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="optimizer step t", ylabel="step-size bound (final_lr · lower, upper)",
           title=f"bound schedules of the best configurations, {int(steps)} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return png(fig)


def message(text: str) -> bytes:
    """A small picture that says why a view has nothing to draw (the dashboard's image slots always get a PNG)."""
    fig = Figure(figsize=(6, 1.2), layout="constrained")
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True, color="#555")
    return png(fig)
