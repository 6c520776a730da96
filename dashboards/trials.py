"""An optimizer study as tables: one row per trial, per seed value, per distinct configuration, per learning rate.

The study follows the contract of ``optstudy study run``: each trial's ``params`` hold ``optimizer`` and ``lr`` (plus
whatever else was searched), its ``user_attrs`` the objective of every seed (``seed_values``, in the order of the
study's ``seeds``) and the MLflow run of every seed (``mlflow_run_ids``). Trials marked ``surplus`` are left out of
everything but the counts. Only the ``Study`` API is used, so any storage works.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import optuna
import numpy as np
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

from optstudy.errors import ConfigError

LOG_SCALE = {"lr", "eps", "final_lr", "gamma"}  # drawn on a log axis whatever their distribution says


@dataclass(frozen=True)
class Settings:
    """What the study's ``user_attrs`` say about it (with fallbacks for studies made by hand)."""

    objective: str
    direction: str  # minimize | maximize
    optimizers: list[str]
    seeds: list
    experiment: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    sign: float = field(init=False)  # +1 minimize, -1 maximize: sign * value is a loss

    def __post_init__(self):
        object.__setattr__(self, "sign", 1.0 if self.direction == "minimize" else -1.0)


def settings(study: optuna.Study) -> Settings:
    attrs = study.user_attrs
    direction = attrs.get("direction") or _study_direction(study)
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"study.user_attrs['direction'] must be minimize or maximize, got {direction!r}")
    return Settings(attrs.get("objective") or "objective", direction, list(attrs.get("optimizers") or []),
                    list(attrs.get("seeds") or []), attrs.get("mlflow_experiment"),
                    attrs.get("mlflow_parent_run_id"), attrs.get("tracking_uri"))


def _study_direction(study: optuna.Study) -> str:
    return "maximize" if study.directions[0] == StudyDirection.MAXIMIZE else "minimize"


def used(trial: optuna.trial.FrozenTrial) -> bool:
    """A completed trial that is not surplus: the ones every table and figure is made of."""
    return trial.state == TrialState.COMPLETE and not trial.user_attrs.get("surplus") and trial.value is not None


def config_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial: number, state, surplus, optimizer, value, seed values, run ids, fail reason, ``params_*``."""
    rows = [dict(number=t.number, state=t.state.name, surplus=bool(t.user_attrs.get("surplus")),
                 optimizer=t.params.get("optimizer"), value=t.value,
                 seed_values=json.dumps(t.user_attrs.get("seed_values")),
                 mlflow_run_ids=json.dumps(t.user_attrs.get("mlflow_run_ids")),
                 fail_reason=t.user_attrs.get("fail_reason"),
                 **{f"params_{k}": v for k, v in t.params.items()})
            for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows, columns=_columns(rows, ["number", "state", "surplus", "optimizer", "value"]))


def seed_table(study: optuna.Study, seeds: list) -> pd.DataFrame:
    """One row per seed value of every used trial: trial, optimizer, config, seed, value, run_id, ``params_*``.

    A trial without ``seed_values`` counts as one value, its own.
    """
    rows = []
    for t in filter(used, study.get_trials(deepcopy=False)):
        values = t.user_attrs.get("seed_values") or [t.value]
        run_ids = list(t.user_attrs.get("mlflow_run_ids") or [t.user_attrs.get("mlflow_run_id")])
        for i, value in enumerate(values):
            rows.append(dict(trial=t.number, optimizer=t.params.get("optimizer"), config=config_key(t.params),
                             seed=seeds[i] if i < len(seeds) else i, value=float(value),
                             run_id=run_ids[i] if i < len(run_ids) else None,
                             **{f"params_{k}": v for k, v in t.params.items()}))
    return pd.DataFrame(rows, columns=_columns(rows, ["trial", "optimizer", "config", "seed", "value", "run_id"]))


def configurations(seeds: pd.DataFrame, sign: float, order: list[str] = ()) -> pd.DataFrame:
    """One row per distinct configuration (trials with equal params pooled): mean, std (ddof=1), min, max over its
    seed values, the count, its trials and run ids; optimizers in ``order`` (then by name), best first within each."""
    if seeds.empty:
        return pd.DataFrame(columns=["optimizer", "config", "mean", "std", "min", "max", "n_values", "trials",
                                     "run_ids"])
    params = [c for c in seeds.columns if c.startswith("params_")]
    grouped = seeds.groupby("config", sort=False)
    table = grouped.agg(optimizer=("optimizer", "first"), mean=("value", "mean"), std=("value", "std"),
                        min=("value", "min"), max=("value", "max"), n_values=("value", "size"),
                        trials=("trial", lambda s: sorted(set(s))), run_ids=("run_id", list))
    table = table.join(grouped[params].first()).reset_index()
    rank = {name: i for i, name in enumerate(order)}
    table["_rank"] = [(rank.get(o, len(rank)), str(o)) for o in table["optimizer"]]
    table["_loss"] = sign * table["mean"]
    table = table.sort_values(["_rank", "_loss"], kind="stable").drop(columns=["_rank", "_loss"])
    return table.reset_index(drop=True)


def best_configurations(configs: pd.DataFrame) -> pd.DataFrame:
    """The best configuration of each optimizer (``configurations`` is sorted best first)."""
    return configs.groupby("optimizer", sort=False).head(1).reset_index(drop=True)


LR_BIN = 0.25  # decades: the width of a non-grid study's lr bins


def lr_curve(configs: pd.DataFrame, sign: float, binned: bool = False) -> pd.DataFrame:
    """Per optimizer and distinct lr, the configuration with the best mean: optimizer, lr, mean, min, max, config,
    trials. The other hyperparameters are at their best for that lr (DeepOBS' learning-rate sensitivity).

    ``binned`` (a study that is not a grid: TPE, random, QMC, where every trial has its own lr and neighbours differ
    in their other hyperparameters too, so a line through all of them zig-zags between unrelated configurations):
    the best configuration of each ``LR_BIN``-decade bin of lr instead, at its own lr."""
    columns = ["optimizer", "lr", "mean", "min", "max", "n_values", "config", "trials"]
    if configs.empty or "params_lr" not in configs:
        return pd.DataFrame(columns=columns)
    table = configs.dropna(subset=["params_lr"]).rename(columns={"params_lr": "lr"})
    table = table.assign(_loss=sign * table["mean"]).sort_values(["lr", "_loss"], kind="stable")
    if binned:
        decades = np.log10(table["lr"].astype(float).clip(lower=1e-300))
        table = table.assign(_bin=np.floor(decades / LR_BIN)).sort_values(["_bin", "_loss"], kind="stable")
    best = table.groupby(["optimizer", "_bin" if binned else "lr"], sort=False).head(1)
    # keep the optimizers' order of ``configs``
    order = {o: i for i, o in enumerate(dict.fromkeys(configs["optimizer"]))}
    best = best.assign(_rank=best["optimizer"].map(order)).sort_values(["_rank", "lr"], kind="stable")
    return best[columns].reset_index(drop=True)


def diverged(trials: pd.DataFrame) -> pd.DataFrame:
    """(optimizer, lr) of each failed trial whose training diverged (its ``fail_reason`` says so: the worker writes
    "Diverged: training diverged: ...")."""
    if trials.empty or "params_lr" not in trials:
        return pd.DataFrame(columns=["optimizer", "lr"])
    reason = trials["fail_reason"].fillna("").astype(str)
    rows = trials[(trials["state"] == "FAIL") & reason.str.contains("diverged", case=False)]
    return rows[["optimizer", "params_lr"]].rename(columns={"params_lr": "lr"}).dropna().reset_index(drop=True)


def optimizer_names(s: Settings, trials: pd.DataFrame) -> list[str]:
    """The study's optimizers in its order, then any other a trial used."""
    seen = [o for o in trials["optimizer"].dropna().unique() if o not in s.optimizers] if len(trials) else []
    return list(s.optimizers) + sorted(seen)


def searched_params(configs: pd.DataFrame, optimizer: str) -> list[str]:
    """The hyperparameters an optimizer's configurations have (``optimizer`` itself left out), lr first."""
    rows = configs[configs["optimizer"] == optimizer]
    names = [c[len("params_"):] for c in rows.columns if c.startswith("params_") and rows[c].notna().any()]
    names = [n for n in names if n != "optimizer"]
    return sorted(names, key=lambda n: (n != "lr", n))


def distributions(study: optuna.Study) -> dict[str, list]:
    """Every distribution each parameter had in the used trials (they may differ between optimizers)."""
    out: dict[str, list] = {}
    for t in filter(used, study.get_trials(deepcopy=False)):
        for name, dist in t.distributions.items():
            if dist not in out.setdefault(name, []):
                out[name].append(dist)
    return out


def is_log(name: str, dists: list) -> bool:
    return name in LOG_SCALE or any(isinstance(d, FloatDistribution) and d.log for d in dists)


def is_categorical(name: str, dists: list) -> bool:
    """Drawn with a category axis: choices that are not all numbers (``final_lr: [0.01, 0.1]`` stays numeric)."""
    return any(isinstance(d, CategoricalDistribution) and not all(_numeric(c) for c in d.choices) for d in dists)


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def best_trial(trials: list, sign: float) -> optuna.trial.FrozenTrial | None:
    """The used trial of ``trials`` (a study's, as read) with the best value (surplus trials ignored, unlike
    ``study.best_trial``)."""
    done = [t for t in trials if used(t) and math.isfinite(t.value)]
    return min(done, key=lambda t: sign * t.value) if done else None


def state_counts(study: optuna.Study) -> pd.DataFrame:
    """Trials by state, surplus trials (the driver prunes them) counted apart: the rows add up to the total."""
    trials = study.get_trials(deepcopy=False)
    kept = [t for t in trials if not t.user_attrs.get("surplus")]
    order = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    counts = {s.name: sum(t.state == s for t in kept) for s in order}
    counts["surplus (ignored)"] = len(trials) - len(kept)
    counts["total"] = len(trials)
    return pd.DataFrame({"state": list(counts), "trials": list(counts.values())})


def _columns(rows: list[dict], first: list[str]) -> list[str]:
    rest = sorted({k for r in rows for k in r} - set(first))
    return first + rest
