"""How forgiving an optimizer is: the width of its good learning-rate region and its expected best of k trials.

Both are computed on losses ``sign * value`` (``sign`` = +1 to minimize, -1 to maximize), so one formula serves both
directions.

**Width within 5%.** With ``b`` the best mean objective, a learning rate is *good* when its mean objective ``v`` is no
worse than ``b`` by more than 5% of ``|b|``: ``v <= b + 0.05 |b|`` to minimize, ``v >= b - 0.05 |b|`` to maximize.
This holds for negative values too (``b = -4`` to minimize: ``v <= -3.8``); ``b = 0`` leaves only ties. Between two
neighbouring grid points the mean objective is interpolated linearly in log10(lr), so a segment whose ends are on
either side of the threshold counts up to the crossing; the width is the total length, in decades, of the good set
(separate good stretches add up) within the searched range, never extrapolated past its end points (a best at an end
makes the width a lower bound: ``touches_edge``).

**Expected best of k.** The best of ``k`` configurations drawn independently and uniformly, with replacement, from an
optimizer's ``n`` completed configurations (Dodge et al. 2019, "Show Your Work"). With the configurations' mean
objectives sorted best first, ``x_(1), ..., x_(n)``, the best of k is ``x_(i)`` with probability
``((n - i + 1) / n)^k - ((n - i) / n)^k``; the expectation is exact, no sampling. ``k = 1`` gives the plain mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TOLERANCE = 0.05
KS = (1, 2, 4, 8)
COLUMNS = ["optimizer", "best", "best_lr", "width_decades", "region_lr_low", "region_lr_high", "lrs_within",
           "lr_points", "touches_edge", *(f"expected_best_k{k}" for k in KS), "configurations", "seeds",
           "seed_values", "complete_trials", "pruned_trials", "fail_trials"]


def threshold(best: float, sign: float, tolerance: float = TOLERANCE) -> float:
    """The worst objective still within ``tolerance`` of ``best``, in the objective's own units."""
    return best + sign * tolerance * abs(best)


def good_region(lrs, values, sign: float, tolerance: float = TOLERANCE) -> dict:
    """Width (decades) of the lr set within ``tolerance`` of the best, its lowest and highest lr, the grid points
    inside, and whether it reaches an end of the searched range. ``lrs`` need not be sorted; values are means."""
    lrs, y = np.asarray(lrs, dtype=float), np.asarray(values, dtype=float)
    x = np.log10(lrs)
    keep = np.isfinite(x) & np.isfinite(y)
    lrs, x, y = lrs[keep], x[keep], y[keep]
    if not len(x):
        return dict(width_decades=np.nan, region_lr_low=np.nan, region_lr_high=np.nan, lrs_within=0, lr_points=0,
                    touches_edge=False)
    order = np.argsort(x)
    lrs, x, y = lrs[order], x[order], y[order]
    best = y[np.argmin(sign * y)]
    margin = sign * (threshold(best, sign, tolerance) - y)  # >= 0: good
    inside = _good_intervals(x, margin)
    return dict(width_decades=float(sum(hi - lo for lo, hi in inside)),
                region_lr_low=_lr(inside[0][0], x, lrs), region_lr_high=_lr(inside[-1][1], x, lrs),
                lrs_within=int((margin >= 0).sum()), lr_points=len(x),
                touches_edge=bool(margin[0] >= 0 or margin[-1] >= 0))


def _lr(log10_lr: float, x: np.ndarray, lrs: np.ndarray) -> float:
    """Back from log10, exactly where the point is on the grid (10 ** log10(0.3) is not 0.3)."""
    on_grid = np.flatnonzero(x == log10_lr)
    return float(lrs[on_grid[0]] if len(on_grid) else 10 ** log10_lr)


def _good_intervals(x: np.ndarray, margin: np.ndarray) -> list[tuple[float, float]]:
    """Where the linear interpolation of ``margin`` over ``x`` is >= 0, as sorted (low, high) intervals; a single
    good grid point is an interval of length 0."""
    pieces = [(x[i], x[i]) for i in range(len(x)) if margin[i] >= 0]
    for i in range(len(x) - 1):
        (x0, x1), (m0, m1) = x[i:i + 2], margin[i:i + 2]
        if m0 >= 0 and m1 >= 0:
            pieces.append((x0, x1))
        elif m0 >= 0 or m1 >= 0:  # crosses the threshold: m0 + t (m1 - m0) = 0
            cross = x0 + (x1 - x0) * m0 / (m0 - m1)
            pieces.append((x0, cross) if m0 >= 0 else (cross, x1))
    return _merge(sorted(pieces))


def _merge(pieces: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in pieces:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def expected_best(values, k: int, sign: float) -> float:
    """Exact expected best of ``k`` i.i.d. uniform draws (with replacement) from ``values``."""
    if k < 1:
        raise ValueError(f"`k >= 1` must hold, but got {k=}.")
    losses = np.sort(sign * np.asarray(values, dtype=float))  # best first
    n = len(losses)
    if not n:
        return np.nan
    i = np.arange(1, n + 1)
    prob = ((n - i + 1) / n) ** k - ((n - i) / n) ** k
    return float(sign * (prob * losses).sum())


def table(optimizers: list[str], configs: pd.DataFrame, curve: pd.DataFrame, trials: pd.DataFrame,
          sign: float) -> pd.DataFrame:
    """One row per optimizer: best, its lr, the 5% region, expected best of k, counts of configurations, seed values
    and trials by state. An optimizer without completed configurations gets counts and empty numbers."""
    rows = [_row(o, configs, curve, trials, sign) for o in optimizers]
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(optimizer: str, configs: pd.DataFrame, curve: pd.DataFrame, trials: pd.DataFrame, sign: float) -> dict:
    mine = configs[configs["optimizer"] == optimizer]
    points = curve[curve["optimizer"] == optimizer]
    states = trials.loc[(trials["optimizer"] == optimizer) & ~trials["surplus"], "state"] if len(trials) else []
    row = dict(optimizer=optimizer, best=np.nan, best_lr=np.nan)
    if len(mine):
        row.update(best=mine["mean"].iloc[0], best_lr=mine["params_lr"].iloc[0] if "params_lr" in mine else np.nan)
    row.update(good_region(points["lr"], points["mean"], sign))
    row.update({f"expected_best_k{k}": expected_best(mine["mean"], k, sign) for k in KS})
    row.update(configurations=len(mine), seeds=int(mine["n_values"].max()) if len(mine) else 0,
               seed_values=int(mine["n_values"].sum()),
               **{f"{s.lower()}_trials": int((pd.Series(states) == s).sum()) for s in ("COMPLETE", "PRUNED", "FAIL")})
    return row
