"""Epochs saved by early stopping, per optimizer, from a study's trials (``trainer.early_stopping`` on).

Each completed trial keeps, per seed, what early stopping ended with (user attr ``early_stopping``, written by
``optstudy.early.record_trial``): the epochs run out of the budget ``max_epochs``, whether it stopped, the best
monitored value and its epoch. ``epochs_saved(study)`` turns them into one row per optimizer and ``figure(table)``
draws it; the report shows both.
"""

from __future__ import annotations

import math

import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.trial import TrialState

__all__ = ["COLUMNS", "epochs_saved", "figure", "runs", "summary_line"]

COLUMNS = ["optimizer", "trials", "runs", "stopped", "budget", "mean_epochs_run", "epochs_saved", "saved_share",
           "best_final", "best_seen", "gap"]


def runs(study: optuna.Study) -> pd.DataFrame:
    """One row per run (a trial's seed) of the completed trials that had early stopping on: ``optimizer``,
    ``trial``, ``seed_index``, ``budget``, ``epochs_run``, ``stopped``, ``best_epoch``, ``best_value`` (the monitored
    metric's best) and ``final`` (the objective's value at the end: the run's value in the trial's mean)."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attr = t.user_attrs.get("early_stopping")
        if not attr:
            continue
        finals = t.user_attrs.get("seed_values") or [t.value] * len(attr["epochs_run"])
        for i, epochs in enumerate(attr["epochs_run"]):
            rows.append({"optimizer": t.params.get("optimizer", "?"), "trial": t.number, "seed_index": i,
                         "budget": attr["max_epochs"], "epochs_run": epochs, "stopped": attr["stopped"][i],
                         "best_epoch": attr["best_epoch"][i], "best_value": attr["best_value"][i],
                         "final": finals[i]})
    return pd.DataFrame(rows, columns=["optimizer", "trial", "seed_index", "budget", "epochs_run", "stopped",
                                       "best_epoch", "best_value", "final"])


def epochs_saved(study: optuna.Study) -> pd.DataFrame:
    """Per optimizer (``COLUMNS``): ``trials`` and ``runs`` with early stopping on, ``stopped`` (runs whose rule
    fired, at the last epoch at the latest), ``mean_epochs_run`` against ``budget``, ``epochs_saved``
    (mean over runs of budget - epochs run) and ``saved_share`` (of the budget); and quality: ``best_final``, the
    best trial's value (mean over seeds of the objective at the end, what the study ranks), ``best_seen``, the mean
    over that trial's seeds of the best monitored value during training, and ``gap`` = how much worse the end is than
    the best seen (>= 0; what training ``patience`` epochs past the best costs). ``best_seen`` and ``gap`` are
    NaN when the monitor is not the objective. Empty when no completed trial had early stopping on."""
    table = runs(study)
    if table.empty:
        return pd.DataFrame(columns=COLUMNS)
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    same = _monitor_is_objective(study)
    out = []
    for optimizer, mine in table.groupby("optimizer", sort=False):
        by_trial = mine.groupby("trial")
        finals = by_trial["final"].mean()
        best_trial = (finals * sign).idxmin()
        best_final = float(finals[best_trial])
        best_seen = float(by_trial["best_value"].mean()[best_trial]) if same else math.nan
        saved = mine["budget"] - mine["epochs_run"]
        out.append({"optimizer": optimizer, "trials": int(mine["trial"].nunique()), "runs": len(mine),
                    "stopped": int(mine["stopped"].sum()), "budget": int(mine["budget"].max()),
                    "mean_epochs_run": float(mine["epochs_run"].mean()), "epochs_saved": float(saved.mean()),
                    "saved_share": float((saved / mine["budget"]).mean()), "best_final": best_final,
                    "best_seen": best_seen, "gap": sign * (best_final - best_seen)})
    return pd.DataFrame(out, columns=COLUMNS)


def _monitor_is_objective(study: optuna.Study) -> bool:
    """From the study's identity (its trials' composed config): ``trainer.early_stopping.monitor`` unset (the
    objective) or the objective itself."""
    identity = study.user_attrs.get("identity") or {}
    monitor = identity.get("trainer.early_stopping.monitor")
    return monitor in (None, "None", "null", "", study.user_attrs.get("objective"))


def figure(table: pd.DataFrame, objective: str = "objective") -> Figure:
    """Two panels, one row per optimizer: epochs run (solid) and saved (light) out of the budget, with the share of
    runs stopped early; and the best trial's final value against the best value seen during its training. The
    matplotlib object API (no pyplot state), one colour per optimizer (``C0``, ``C1``, ... in table order), as the
    report's figures."""
    fig = Figure(figsize=(10, 0.9 + 0.5 * max(len(table), 2)), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = list(table["optimizer"])
    y = range(len(names))
    colours = [f"C{i % 10}" for i in y]
    left.barh(y, table["mean_epochs_run"], color=colours, label="epochs run (mean)")
    left.barh(y, table["epochs_saved"], left=table["mean_epochs_run"], color=colours, alpha=0.3,
              label="epochs saved")
    for i, row in enumerate(table.itertuples()):
        left.text(row.budget, i, f" {row.stopped}/{row.runs} stopped, {row.saved_share:.0%} saved", va="center",
                  fontsize=8)
    budget = float(table["budget"].max()) if len(table) else 1.0
    left.set(yticks=list(y), yticklabels=names, xlim=(0, budget * 1.6), xlabel="epochs (budget at the end of the bar)",
             title="epochs run and saved by early stopping")
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize=8)
    right.scatter(table["best_final"], y, color=colours, marker="o", label="final (best trial, at its stop)", zorder=3)
    if table["best_seen"].notna().any():
        right.scatter(table["best_seen"], y, color=colours, marker="|", s=200, label="best seen in training", zorder=3)
        for i, row in enumerate(table.itertuples()):
            right.plot([row.best_seen, row.best_final], [i, i], color=colours[i], lw=1)
    right.set(yticks=list(y), yticklabels=[""] * len(names), xlabel=objective, title="final quality vs the best seen")
    right.invert_yaxis()
    right.grid(alpha=0.3)
    right.legend(loc="lower right", fontsize=8)
    return fig


def summary_line(table: pd.DataFrame) -> str:
    """One line per optimizer, for a terminal: ``adam: 5/6 runs stopped, 11.2 of 20 epochs run (44% saved)``."""
    return "\n".join(f"{r.optimizer}: {r.stopped}/{r.runs} runs stopped, {r.mean_epochs_run:.1f} of {r.budget} "
                     f"epochs run ({r.saved_share:.0%} saved); best final {r.best_final:.4g}"
                     + ("" if math.isnan(r.best_seen) else f" vs best seen {r.best_seen:.4g}")
                     for r in table.itertuples()) or "no completed trial had early stopping on"

