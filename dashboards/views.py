"""The views of a study, each drawn by one function from the study's tables (``report.Tables``) and, for the ones
that read MLflow, a client: the static report (``report``) and the live dashboard (``app``) both call these, so a
view looks the same in the file that is mailed around and in the browser.

A view function returns PNG bytes (``figures``), or None where the study has nothing to draw yet.
"""

from __future__ import annotations

import pandas as pd
from optstudy.dashboards import figures, runs
from optstudy.dashboards import trials as tr

BOUNDED = ("adabound", "amsbound")  # optimizers whose step sizes are clipped by a bound schedule
DEFAULT_STEPS = 10_000  # the bound schedules' horizon when no run says how many steps training took


def hyperparameters(t, optimizer: str) -> bytes | None:
    """The objective against each hyperparameter of one optimizer: seeds, configurations' means, min-max bars."""
    params = tr.searched_params(t.configs, optimizer)
    if not params:
        return None
    return figures.hyperparameters(optimizer, t.seeds[t.seeds["optimizer"] == optimizer],
                                   t.configs[t.configs["optimizer"] == optimizer], params,
                                   {p: t.kinds.get(p, (False, False)) for p in params}, t.settings.objective,
                                   t.colors[optimizer])


def pair_params(t, optimizer: str) -> list[str]:
    """The hyperparameters other than lr that take more than one value among an optimizer's configurations."""
    mine = t.configs[t.configs["optimizer"] == optimizer]
    if "params_lr" not in mine or mine["params_lr"].nunique() < 2:
        return []
    return [p for p in tr.searched_params(t.configs, optimizer)
            if p != "lr" and mine[f"params_{p}"].astype(str).nunique() > 1]


def pairs(t, optimizer: str) -> bytes | None:
    """The 2-D views of one optimizer: lr × β1, lr × final_lr, lr × γ, lr × the bound schedule's parameter."""
    others = pair_params(t, optimizer)
    if not others:
        return None
    return figures.pairs(optimizer, t.configs[t.configs["optimizer"] == optimizer], others, t.kinds,
                         t.settings.objective, t.settings.sign)


def lr_sensitivity(t) -> bytes | None:
    if not len(t.curve):
        return None
    points = t.configs.rename(columns={"params_lr": "lr"}) if t.binned else None
    return figures.lr_sensitivity(t.curve, t.settings.objective, t.colors, points, tr.diverged(t.trials))


def importances(table: pd.DataFrame) -> bytes | None:
    return figures.importance_bars(table) if len(table) else None


def best_curves(t, client) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Per optimizer, the learning curve (mean, min, max over seeds) of its best configuration, and notes."""
    shown, notes = {}, []
    for _, best in t.best.iterrows():
        table, missing = runs.curves(client, best["run_ids"], t.settings.objective)
        notes += [f"{best['optimizer']}: {m}" for m in missing]
        if len(table):
            shown[best["optimizer"]] = table.assign(trials=[best["trials"]] * len(table))
    return shown, notes


def trial_curves(t, client, numbers: list[int]) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str]]:
    """The learning curves of chosen trials (mean, min, max over each trial's seeds), their colours, notes."""
    rows = t.trials.set_index("number") if len(t.trials) else t.trials
    shown, color, notes = {}, {}, []
    for i, number in enumerate(numbers):
        if number not in rows.index:
            notes.append(f"trial {number}: not in the study")
            continue
        row = rows.loc[number]
        run_ids = [r for r in (_json(row["mlflow_run_ids"]) or []) if r]
        if not run_ids:
            notes.append(f"trial {number}: no MLflow runs ({row['state'].lower()})")
            continue
        table, missing = runs.curves(client, run_ids, t.settings.objective)
        notes += [f"trial {number}: {m}" for m in missing]
        if len(table):
            label = f"trial {number} ({row['optimizer']})"
            shown[label], color[label] = table, f"C{i % 10}"
    return shown, color, notes


def curves(shown: dict[str, pd.DataFrame], t, color: dict[str, str] | None = None, title: str | None = None):
    if not shown:
        return None
    extra = {} if title is None else {"title": title}
    return figures.learning_curves(shown, t.settings.objective, color or t.colors, **extra)


def best_histograms(t, client) -> tuple[list[tuple[str, int, str, dict]], list[str]]:
    """(optimizer, trial, run id, arrays of ``eff_lr_histograms.npz``) of the first seed's run of each optimizer's best
    configuration, and notes for those that have none."""
    found, notes = [], []
    for _, best in t.best.iterrows():
        run_id = best["run_ids"][0] if best["run_ids"] else None
        arrays = runs.histograms(client, run_id)
        if isinstance(arrays, runs.Missing):
            notes.append(f"{best['optimizer']}: {arrays}")
        else:
            found.append((best["optimizer"], best["trials"][0], run_id, arrays))
    return found, notes


def heatmap(arrays: dict, optimizer: str) -> bytes:
    return figures.heatmap(arrays, optimizer)


def final_distributions(found: list[tuple[str, int, str, dict]], t) -> tuple[bytes | None, dict[str, pd.DataFrame]]:
    finals = {o: runs.final_distribution(a).assign(optimizer=o, run_id=r) for o, _, r, a in found}
    return (figures.final_distributions(finals, t.colors) if finals else None), finals


def schedules(t) -> dict[str, tuple[float, object]]:
    """The bound schedule of each bounded optimizer's best configuration and, where the study searched the schedule
    (``bound``), of the best configuration of each schedule: label -> (final_lr, schedule). Parameters a trial did
    not search take the optimizer's defaults (final_lr 0.1, γ 1e-3, β2 0.999)."""
    from optstudy.optim.bounds import make_bound

    out = {}
    for optimizer in [o for o in t.optimizers if o in BOUNDED]:
        mine = t.configs[t.configs["optimizer"] == optimizer]  # best first
        if not len(mine):
            continue
        picks = [("", mine.iloc[0])]
        if "params_bound" in mine and mine["params_bound"].notna().any():
            picks = [(f" {name}", rows.iloc[0]) for name, rows in mine.groupby("params_bound", sort=False)]
        for suffix, row in picks:
            params = {c[len("params_"):]: v for c, v in row.items() if c.startswith("params_") and pd.notna(v)}
            spec = {"name": params.get("bound", "hyperbolic"),
                    **{k[len("bound."):]: v for k, v in params.items() if k.startswith("bound.")}}
            label = f"{optimizer}{suffix}" if suffix else optimizer
            try:
                schedule = make_bound(spec, gamma=float(params.get("gamma", 1e-3)),
                                      beta2=float(params.get("beta2", 0.999)))
            except (ValueError, TypeError):  # a schedule this version does not know: left out
                continue
            out[label] = (float(params.get("final_lr", 0.1)), schedule)
    return out


def bound_steps(found: list[tuple[str, int, str, dict]]) -> int | None:
    """How many steps the bounded optimizers' best runs took (their histograms' last record), for the schedules'
    horizon."""
    return max((int(a["steps"][-1]) for o, _, _, a in found if o in BOUNDED), default=None)


def bound_schedules(t, steps: int | None = None) -> bytes | None:
    found = schedules(t)
    if not found:
        return None
    return figures.bound_schedules(found, steps or DEFAULT_STEPS, t.colors)


def _json(text):
    import json

    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None


def early_stopping(study) -> tuple[pd.DataFrame, bytes | None]:
    """Epochs saved by early stopping per optimizer (``optstudy.study.early``) and its figure; an empty table and
    None when no completed trial had it on."""
    from optstudy.study import early

    table = early.epochs_saved(study)
    if table.empty:
        return table, None
    return table, figures.png(early.figure(table, study.user_attrs.get("objective", "objective")))

