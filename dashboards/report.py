"""The sensitivity report of an optimizer study: one self-contained HTML page and the CSV tables behind it.

``write(study, out_dir)`` writes ``out_dir/index.html`` with seven sections (the study; the objective against each
hyperparameter; learning-rate sensitivity; robustness; importances; learning curves; effective learning rates) and
``trials.csv``, ``seed_values.csv``, ``configurations.csv``, ``lr_sensitivity.csv``, ``robustness.csv``,
``importances.csv``, ``learning_curves.csv``, ``eff_lr_final.csv``. A missing piece (no MLflow runs, no artifact, an
optimizer whose trials all failed) becomes a note in its section.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from optstudy.dashboards import figures, robustness, runs, views
from optstudy.dashboards import html as h
from optstudy.dashboards import trials as tr
from optstudy.dashboards.importance import importances


@dataclass
class Tables:
    """The study as tables, computed once for every section."""

    settings: tr.Settings
    optimizers: list[str]
    trials: pd.DataFrame  # every trial
    seeds: pd.DataFrame  # one row per seed value of the used trials
    configs: pd.DataFrame  # one row per distinct configuration, best first per optimizer
    best: pd.DataFrame  # the best configuration of each optimizer
    curve: pd.DataFrame  # best mean per optimizer and lr (per lr bin when not a grid)
    kinds: dict[str, tuple[bool, bool]]  # parameter -> (log axis, categorical)
    colors: dict[str, str]
    binned: bool = False  # not a grid study: the curve is per lr bin


def tables(study: optuna.Study) -> Tables:
    s = tr.settings(study)
    trials = tr.trial_table(study)
    seeds = tr.seed_table(study, s.seeds)
    optimizers = tr.optimizer_names(s, trials)
    configs = tr.configurations(seeds, s.sign, optimizers)
    kinds = {n: (tr.is_log(n, d), tr.is_categorical(n, d)) for n, d in tr.distributions(study).items()}
    spec = study.user_attrs.get("spec")  # None: a study made by hand, drawn per lr as before
    binned = spec is not None and spec.get("sampler", {}).get("name") != "grid"
    return Tables(s, optimizers, trials, seeds, configs, tr.best_configurations(configs),
                  tr.lr_curve(configs, s.sign, binned), kinds, figures.colors(optimizers), binned)


def write(study: optuna.Study, out_dir: Path, tracking_uri: str | None = None) -> Path:
    """Writes ``out_dir/index.html`` and its CSV tables; returns the page's path. MLflow is read through
    ``tracking_uri``, else the study's ``tracking_uri`` attribute."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = tables(study)
    uri = tracking_uri or t.settings.tracking_uri
    client = runs.client(uri)
    sections = [header(study, t, uri), hyperparameter_section(t), lr_section(t), robustness_section(t),
                importance_section(study, t), curves_section(t, client), eff_lr_section(t, client)]
    sections += [s for s in [early_section(study)] if s is not None]
    for section in sections:
        for name, table in section.csvs.items():
            table.to_csv(out_dir / name, index=False)
    path = out_dir / "index.html"
    path.write_text(h.page(f"Sensitivity report: {study.study_name}", sections), encoding="utf-8")
    return path


def header(study: optuna.Study, t: Tables, uri: str | None) -> h.Section:
    from optstudy.tracking import ui_command  # here: it imports Lightning, which the dashboard's views do not need

    s = t.settings
    section = h.Section("study", "1. Study", csvs={"trials.csv": t.trials})
    section.parts.append(h.definitions({
        "study": study.study_name, "objective": f"{s.objective} ({s.direction})",
        "budget": study.user_attrs.get("budget", "—"),
        "overrides": " ".join(study.user_attrs.get("overrides") or []) or "—",
        "optimizers": ", ".join(t.optimizers) or "—", "seeds": ", ".join(map(str, s.seeds)) or "—",
        "MLflow experiment": s.experiment or "—", "MLflow parent run": s.parent_run_id or "—",
        "tracking URI": _redacted(uri) if uri else "—",
        "open with": ui_command(_redacted(uri), study.user_attrs.get("mlflow_experiment_id")) if uri else "—"}))
    section.parts += ["<h3>Trials by state</h3>", h.table(tr.state_counts(study), "states")]
    section.parts += ["<h3>Best trial</h3>", *_best_trial(study, t)]
    failed = t.trials[t.trials["state"] == "FAIL"]
    if len(failed):
        section.parts += ["<h3>Failed trials</h3>",
                          h.table(failed.reindex(columns=["number", "optimizer", "fail_reason"]), "failed")]
    return section


def _best_trial(study: optuna.Study, t: Tables) -> list[str]:
    best = tr.best_trial(study.get_trials(deepcopy=False), t.settings.sign)
    if best is None:
        return [h.note("no completed trial (surplus trials are ignored)")]
    attrs = best.user_attrs
    params = pd.DataFrame({"param": list(best.params), "value": [h.number(v) for v in best.params.values()]})
    # trials run with logger=none have no runs: their ids are None
    run_ids = [r for r in attrs.get("mlflow_run_ids") or [attrs.get("mlflow_run_id")] if r] or ["—"]
    return [h.definitions({"trial": best.number, "optimizer": best.params.get("optimizer", "—"),
                           t.settings.objective: h.number(best.value),
                           "seed values": ", ".join(h.number(float(v)) for v in attrs.get("seed_values", [])) or "—",
                           "MLflow runs": ", ".join(run_ids)}),
            h.table(params, "best-params")]


def hyperparameter_section(t: Tables) -> h.Section:
    section = h.Section("hyperparameters", "2. Objective against each hyperparameter", csvs={
        "seed_values.csv": t.seeds, "configurations.csv": _jsonable(t.configs)})
    section.parts.append(h.para("Dots: the objective of every seed; marker: the mean over seeds of each distinct "
                                "configuration; bar: its spread, min to max over seeds. lr, eps, final_lr and gamma "
                                "(and any log-scale parameter) on a log axis."))
    for optimizer in t.optimizers:
        png = views.hyperparameters(t, optimizer)
        if png is None:
            section.parts.append(h.note(f"{optimizer}: {_absent(t, optimizer)}"))
            continue
        section.parts += [f"<h3>{h.esc(optimizer)}</h3>", h.img(png, f"{optimizer}: objective per hyperparameter")]
        pair = views.pairs(t, optimizer)  # the 2-D views, where the optimizer searched more than lr
        if pair is not None:
            section.parts.append(h.img(pair, f"{optimizer}: lr against each other hyperparameter",
                                       "2-D views: one dot per configuration, coloured by its mean over seeds"))
    return section


def lr_section(t: Tables) -> h.Section:
    section = h.Section("lr-sensitivity", "3. Learning-rate sensitivity, all optimizers",
                        csvs={"lr_sensitivity.csv": _jsonable(t.curve)})
    if t.binned:
        section.parts.append(h.para(
            f"Not a grid study: every trial has its own lr, and neighbouring trials differ in their other "
            f"hyperparameters too, so a line through all of them would join unrelated configurations. The line is the "
            f"best configuration (mean objective over seeds) of each {tr.LR_BIN:g}-decade bin of lr, at its own lr; "
            f"the band is its min to max over seeds; the dots are every configuration."))
    else:
        section.parts.append(h.para("For each optimizer and learning rate of the grid, the configuration with the best "
                                    "mean objective over seeds (its other hyperparameters at their best for that lr); "
                                    "the band is that configuration's min to max over seeds."))
    png = views.lr_sensitivity(t)
    if png is not None:
        section.parts.append(h.img(png, "learning-rate sensitivity"))
    for optimizer, rows in tr.diverged(t.trials).groupby("optimizer", sort=False):
        section.parts.append(h.note(f"{optimizer} diverged at lr {', '.join(f'{lr:.3g}' for lr in sorted(rows['lr']))} "
                                    "(marked x on the top edge)"))
    section.parts += [h.note(f"{o}: {_absent(t, o)}") for o in t.optimizers if o not in set(t.curve["optimizer"])]
    return section


def robustness_section(t: Tables) -> h.Section:
    table = robustness.table(t.optimizers, t.configs, t.curve, t.trials, t.settings.sign)
    section = h.Section("robustness", "4. Robustness", csvs={"robustness.csv": table})
    tol = f"{robustness.TOLERANCE:.0%}"
    section.parts.append(h.definitions({
        "best": f"the best mean {t.settings.objective} over seeds of any configuration; best_lr its lr",
        "width_decades": f"the total width, in decades of lr, of the set where the best mean objective at that lr is "
                         f"within {tol} of best: value <= best + {tol}·|best| to minimize, value >= best - "
                         f"{tol}·|best| to maximize (so also for negative values; best = 0 leaves ties only). Between "
                         "neighbouring lrs the mean is interpolated linearly in log10(lr) up to the threshold "
                         "crossing; separate stretches add up; nothing is extrapolated beyond the searched lrs.",
        "region_lr_low / high": "the lowest and highest lr of that set; lrs_within: grid lrs inside it, of lr_points",
        "touches_edge": "the set reaches the lowest or highest lr searched: the width is a lower bound",
        "expected_best_kK": "the expected best mean objective of K configurations drawn uniformly with replacement "
                            "from the optimizer's completed configurations, exactly: with means sorted best first, "
                            "x(i) is the best of K with probability ((n-i+1)/n)^K - ((n-i)/n)^K (k=1: the mean)",
        "configurations / seeds / seed_values": "distinct configurations completed; seeds per configuration (most); "
                                                "seed values in all",
        "*_trials": "trials of the optimizer by state (surplus trials left out)"}))
    section.parts.append(h.transposed(table, "optimizer", "robustness-table"))
    return section


def importance_section(study: optuna.Study, t: Tables) -> h.Section:
    table, notes = importances(study, t.settings, t.optimizers)
    section = h.Section("importances", "5. Hyperparameter importances", csvs={"importances.csv": table})
    section.parts.append(h.para("optuna.importance.get_param_importances with FanovaImportanceEvaluator(seed=0) "
                                "(Optuna 5's default evaluator is PED-ANOVA; fANOVA is asked for explicitly), "
                                "normalized to sum to 1 per scope, on the configurations' mean objective over seeds. "
                                "A parameter only some trials have (bound.rate with bound=exponential, ...) is "
                                "compared in a scope of the trials that have it, with everything that varies there."))
    section.parts.append(h.para("optuna-dashboard shows other numbers for the same study: it uses PED-ANOVA, which "
                                "asks how differently each parameter is distributed among the best trials (top 10%) "
                                "than among all, while fANOVA asks how much of the objective's variance each "
                                "parameter explains; and it pools all trials, without our per-optimizer scopes. "
                                "Both are right about different questions."))
    if len(table):
        section.parts += [h.table(table, "importances-table"), h.img(views.importances(table), "importances")]
    section.parts += [h.note(n) for n in notes]
    return section


def curves_section(t: Tables, client) -> h.Section:
    columns = ["optimizer", "trials", "step", "mean", "min", "max", "runs"]
    section = h.Section("learning-curves", "6. Learning curves of the best configurations",
                        csvs={"learning_curves.csv": pd.DataFrame(columns=columns)})
    key = t.settings.objective
    section.parts.append(h.para(f"{key} at the end of each epoch against optimizer steps, read from MLflow: the best "
                                "configuration of each optimizer, mean over its seeds, band min to max."))
    if isinstance(client, runs.Missing):
        section.parts.append(h.note(client))
        return section
    shown, notes = views.best_curves(t, client)
    rows = [table.assign(optimizer=o, trials=json.dumps(table["trials"].iloc[0])) for o, table in shown.items()]
    if shown:
        section.parts.append(h.img(views.curves(shown, t), "learning curves"))
    notes += [f"{o}: {_absent(t, o)}" for o in t.optimizers if o not in set(t.best["optimizer"])]
    section.parts += [h.note(n) for n in notes]
    section.csvs["learning_curves.csv"] = _long(rows, columns)
    return section


def eff_lr_section(t: Tables, client) -> h.Section:
    columns = ["optimizer", "run_id", "step", "log10_lr_low", "log10_lr_high", "fraction"]
    section = h.Section("effective-lr", "7. Effective learning rates of the best runs",
                        csvs={"eff_lr_final.csv": pd.DataFrame(columns=columns)})
    section.parts.append(h.para(f"From {runs.HISTOGRAMS} of the first seed's run of each optimizer's best "
                                "configuration: the histograms over training (heatmaps, as optstudy.lrlog draws them) "
                                "and the distribution of log10 effective lr at the last record, overlaid."))
    if isinstance(client, runs.Missing):
        section.parts.append(h.note(client))
        return section
    found, notes = views.best_histograms(t, client)
    heatmaps = [h.img(views.heatmap(arrays, o), f"{o} heatmap", f"{o}, trial {trial}, run {run_id}")
                for o, trial, run_id, arrays in found]
    final_png, finals = views.final_distributions(found, t)
    if heatmaps:
        section.parts += ['<div class="row">', *heatmaps, "</div>", h.img(final_png, "final effective-lr distributions")]
    bounds = views.bound_schedules(t, views.bound_steps(found))
    if bounds is not None:
        section.parts.append(h.img(bounds, "bound schedules", "AdaBound's clip range over training: the bound "
                                                              "schedules of the best configurations"))
    notes += [f"{o}: {_absent(t, o)}" for o in t.optimizers if o not in set(t.best["optimizer"])]
    section.parts += [h.note(n) for n in notes]
    final = _long(list(finals.values()), columns)
    section.csvs["eff_lr_final.csv"] = final[final["fraction"] > 0]
    return section


def _absent(t: Tables, optimizer: str) -> str:
    mine = t.trials[(t.trials["optimizer"] == optimizer) & ~t.trials["surplus"]] if len(t.trials) else t.trials
    counts = mine["state"].value_counts().to_dict() if len(mine) else {}
    found = ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) or "no trials"
    return f"no completed configuration ({found})"


def _long(tables: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)


def _jsonable(table: pd.DataFrame) -> pd.DataFrame:
    """Lists (trials, run ids) as JSON text in CSV cells."""
    return table.assign(**{c: table[c].map(json.dumps) for c in ("trials", "run_ids") if c in table})


def _redacted(uri: str) -> str:
    """A tracking URI without its password (``postgresql://user:***@host/db``)."""
    return re.sub(r"(//[^/:@]+:)[^@/]+@", r"\1***@", uri)


def early_section(study: optuna.Study) -> h.Section | None:
    """8. Epochs saved by early stopping, when the study's trials ran with ``trainer.early_stopping`` on."""
    table, png = views.early_stopping(study)
    if png is None:
        return None
    section = h.Section("early-stopping", "8. Early stopping: epochs saved per optimizer",
                        csvs={"early_stopping.csv": table})
    section.parts.append(h.para("Per optimizer, the completed trials' runs (one per seed): how many stopped early, the "
                                "epochs they ran out of the budget and the share saved; and the best trial's final "
                                "value (what the study ranks) against the best value its runs saw during training "
                                "(the gap is what training past the best cost)."))
    section.parts += [h.table(table, "early-stopping-table"), h.img(png, "epochs saved by early stopping")]
    return section

