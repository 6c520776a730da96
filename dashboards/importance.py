"""Hyperparameter importances with Optuna's fANOVA evaluator, over all optimizers and per optimizer, and over the
trials that have a conditional parameter (one only some trials have, e.g. ``bound.rate``), so that every searched
parameter is in some scope.

Optuna 5's ``get_param_importances`` defaults to PED-ANOVA; this report asks for ``FanovaImportanceEvaluator``
explicitly (seeded, so the page is reproducible). The trials are copied into an in-memory study first: to leave
surplus trials out, to keep one optimizer's trials, and to give each parameter one distribution (optimizers'
lr ranges may differ, which Optuna's evaluators refuse), the union of the ranges.
"""

from __future__ import annotations

import contextlib

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.importance import FanovaImportanceEvaluator, get_param_importances

from optstudy.dashboards.trials import Settings, used

MIN_TRIALS = 3  # fewer and fANOVA's forest has nothing to split; below ~20 its numbers are a rough guide
EVALUATOR = "fANOVA"


def importances(study: optuna.Study, s: Settings, optimizers: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows (scope, param, importance, trials, evaluator) for ``all optimizers`` and each optimizer where it can be
    computed; a note for each scope where it cannot."""
    trials = [t for t in study.get_trials(deepcopy=False) if used(t)]
    scopes = [("all optimizers", trials, [])] + [
        (o, [t for t in trials if t.params.get("optimizer") == o], ["optimizer"]) for o in optimizers]
    main = [(scope, mine, _params(mine, drop)[0]) for scope, mine, drop in scopes]
    # a conditional parameter (bound.rate: only trials with bound=exponential have it) gets a scope of the trials
    # that have it, where it is compared with everything that varies among them; an optimizer's first
    subs = [sub for (scope, mine, drop), (_, _, shared) in reversed(list(zip(scopes, main)))
            for sub in _conditional_scopes(scope, mine, shared, drop)]
    rows, notes, seen = [], [], {}
    for scope, group, params in [*main, *subs]:
        numbers = frozenset(t.number for t in group)
        if numbers in seen and (scope, group, params) in subs:
            notes.append(f"{scope}: the same trials as scope {seen[numbers]!r}")
            continue
        seen.setdefault(numbers, scope)
        result = _scope(group, s, params)
        if isinstance(result, str):
            notes.append(f"{scope}: {result}")
            continue
        rows += [dict(scope=scope, param=p, importance=v, trials=len(group), evaluator=EVALUATOR)
                 for p, v in result.items()]
    return pd.DataFrame(rows, columns=["scope", "param", "importance", "trials", "evaluator"]), notes


def _conditional_scopes(scope: str, trials: list, shared: list[str], drop: list[str]) -> list[tuple]:
    """``(name, trials, params)`` for each set of parameters beyond ``shared`` that some trials have: those
    trials, with every parameter that varies among them."""
    groups: dict[tuple, list] = {}
    for t in trials:
        extra = tuple(sorted(set(t.params) - set(shared) - set(drop)))
        if extra:
            groups.setdefault(extra, []).append(t)
    out = []
    for extra, group in sorted(groups.items()):
        varying = [p for p in sorted({p for t in group for p in t.params} - set(drop))
                   if len({repr(t.params.get(p)) for t in group}) > 1]
        out.append((f"{scope}, trials with {', '.join(extra)}", group, varying))
    return out


def _params(trials: list, drop: list[str]) -> tuple[list[str], list[str]]:
    """The parameters every trial has, and those only some have."""
    if not trials:
        return [], []
    every, some = set.intersection(*(set(t.params) for t in trials)), set.union(*(set(t.params) for t in trials))
    return sorted(every - set(drop)), sorted(some - every - set(drop))


def _scope(trials: list, s: Settings, params: list[str]) -> dict[str, float] | str:
    """The importances of ``params`` over ``trials``, or why there are none."""
    if not trials:
        return "no completed trials"
    if len(params) < 2:
        return f"only {', '.join(params) or 'no parameter'} searched (importances need at least 2 parameters)"
    if len(trials) < max(MIN_TRIALS, len(params) + 1):
        return f"{len(trials)} completed trials for {len(params)} parameters: too few for fANOVA"
    try:
        with _quiet():
            study = optuna.create_study(direction=s.direction)
        study.add_trials([_restricted(t, params, _union(trials, params)) for t in trials])
        return get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=params)
    except (ValueError, RuntimeError, ArithmeticError) as exc:  # e.g. every trial with the same value
        return f"fANOVA could not be computed ({type(exc).__name__}: {exc})"


@contextlib.contextmanager
def _quiet():
    """Without Optuna's line per in-memory study ("A new study created in memory ...")."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(before, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _union(trials: list, params: list[str]) -> dict:
    """One distribution per parameter spanning what every trial had."""
    out = {}
    for name in params:
        dists = [t.distributions[name] for t in trials]
        if all(isinstance(d, FloatDistribution) for d in dists):
            out[name] = FloatDistribution(min(d.low for d in dists), max(d.high for d in dists),
                                          log=all(d.log for d in dists))
        elif all(isinstance(d, IntDistribution) for d in dists):
            out[name] = IntDistribution(min(d.low for d in dists), max(d.high for d in dists),
                                        log=all(d.log for d in dists))
        elif all(isinstance(d, CategoricalDistribution) for d in dists):
            out[name] = CategoricalDistribution(list(dict.fromkeys(c for d in dists for c in d.choices)))
        else:
            out[name] = dists[0]
    return out


def _restricted(trial, params: list[str], dists: dict) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(params={p: trial.params[p] for p in params}, distributions=dists,
                                     value=trial.value)
