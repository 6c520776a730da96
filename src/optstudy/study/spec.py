"""Study files: a YAML description of a search over optimizers' hyperparameters, checked where it enters.

    name: bounds
    objective: val_loss            # a metric train.py returns (default: the config's objective)
    direction: minimize
    n_trials: 60                   # budget: finished trials (complete, pruned, failed), over all workers
    seeds: [0, 1, 2]               # every configuration trains once per seed; its value is their mean
    sampler: {name: tpe, seed: 0}  # tpe | random | grid | qmc | cmaes
    pruner: {name: median}         # median | percentile | hyperband | successive_halving | none (+ their keywords)
    enqueue_defaults: true         # the papers' defaults first (Adam lr=1e-3; AdaBound 1e-3, final_lr 0.1, γ 1e-3)
    overrides: [trainer.max_epochs=10]  # Hydra overrides that fix the problem
    population: 16                 # ask up to 16 trials at once and train them as populations (default 1)
    optimizers:
      adabound:
        lr: {low: 1.0e-4, high: 1.0e-1, log: true}     # a range ...
        final_lr: [0.01, 0.1, 1.0]                      # ... or a list of values
        gamma: {low: 1.0e-4, high: 1.0e-2, log: true}
        bound:                                          # schedules, each with its own space (conditional)
          hyperbolic: {}
          exponential: {rate: {low: 1.0e-4, high: 1.0e-2, log: true}}

Searchable keys per optimizer: lr, beta1, beta2, eps, momentum, weight_decay, final_lr, gamma, bound, and any other
config key by its dotted path (``data.order: [shuffle, curriculum]``; with enqueued defaults, the first value listed).
A grid study (``sampler: grid``) takes lists only and runs every combination exactly once.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import yaml

import optstudy.optim as optim
from optstudy.errors import ConfigError
from optstudy.optim.bounds import SCHEDULES

SAMPLERS = ("tpe", "random", "grid", "qmc", "cmaes")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "none")
HPARAMS = ("lr", "beta1", "beta2", "eps", "momentum", "weight_decay", "final_lr", "gamma")
# the papers' defaults, enqueued first so that every study contains the baseline a reader expects
PAPER_DEFAULTS = {"adam": {"lr": 1e-3}, "adabound": {"lr": 1e-3, "final_lr": 0.1, "gamma": 1e-3},
                  "amsbound": {"lr": 1e-3, "final_lr": 0.1, "gamma": 1e-3}}


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched value: a float range (``low``, ``high``, ``log``; ``int`` for integers) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial, grid: bool = False):
        if self.choices is not None and grid and all(_number(c) for c in self.choices):
            # a grid trial's value is fixed (enqueued); a numeric range holding every choice records it, while a
            # categorical would have to list the same choices for every optimizer (Optuna's rule for a name)
            low, high = min(self.choices), max(self.choices)
            log = low > 0
            if all(isinstance(c, int) for c in self.choices):
                return trial.suggest_int(self.name, low, max(high, low + 1), log=log)
            return trial.suggest_float(self.name, low, high if high > low else low * 2 if log else low + 1, log=log)
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Space:
    """One optimizer's search space; ``bounds`` maps a schedule name to its own params (conditional)."""

    optimizer: str
    params: tuple[Param, ...]
    bounds: dict[str, tuple[Param, ...]] | None = None

    def grid(self) -> list[dict]:
        """Every combination of a list-only space, as trial params."""
        fixed = [[(p.name, v) for v in p.choices] for p in self.params]
        base = [dict(combo, optimizer=self.optimizer) for combo in itertools.product(*fixed)]
        if not self.bounds:
            return base
        out = []
        for name, params in self.bounds.items():
            for combo in itertools.product(*[[(p.name, v) for v in p.choices] for p in params]):
                out += [{**b, "bound": name, **dict(combo)} for b in base]
        return out


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    spaces: dict[str, Space]
    objective: str | None = None
    direction: str = "minimize"
    n_trials: int = 20
    seeds: tuple[int, ...] = (0,)
    sampler: dict = dataclasses.field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict = dataclasses.field(default_factory=lambda: {"name": "median"})
    enqueue_defaults: bool = True
    overrides: tuple[str, ...] = ()
    population: int = 1  # trials asked at once and trained as populations (optstudy.study.population)
    source: dict = dataclasses.field(default_factory=dict)

    def grid(self) -> list[dict]:
        return [point for space in self.spaces.values() for point in space.grid()]

    def defaults(self) -> list[dict]:
        """Trial params of the papers' defaults that lie in this study's space."""
        out = []
        for name, values in PAPER_DEFAULTS.items():
            space = self.spaces.get(name)
            if space is None:
                continue
            point = {"optimizer": name}
            params = list(space.params)
            if space.bounds:
                point["bound"] = "hyperbolic" if "hyperbolic" in space.bounds else next(iter(space.bounds))
                params += space.bounds[point["bound"]]
            for p in params:  # a param the paper does not set: the middle of its range (a config key's list: its first)
                first = p.choices[0] if "." in p.name and not p.name.startswith("bound.") and p.choices else None
                point[p.name] = values.get(p.name.removeprefix("bound."), _middle(p) if first is None else first)
            if all(_inside(p, point[p.name]) for p in params):
                out.append(point)
        return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _middle(p: Param):
    if p.choices is not None:
        return p.choices[len(p.choices) // 2]
    mid = (p.low * p.high) ** 0.5 if p.log else (p.low + p.high) / 2
    return int(round(mid)) if p.integer else mid


def _inside(p: Param, value) -> bool:
    return value in p.choices if p.choices is not None else p.low <= value <= p.high


SHIPPED = "optstudy._studies"  # the repository's studies/, installed as this package (setup.py maps it)


def shipped() -> list[str]:
    """The names of the study files optstudy ships (``lr_sensitivity``, ``bounds``, ...)."""
    from importlib import resources

    return sorted(f.name[:-5] for f in resources.files(SHIPPED).iterdir() if f.name.endswith(".yaml"))


def find(path_or_name: str | Path):
    """A study file: ``path_or_name`` if it is a file, else the shipped study of that name (``.yaml`` optional);
    a ``ConfigError`` listing the shipped ones otherwise."""
    from importlib import resources

    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in shipped():  # a bare name, not a missing path elsewhere
        return resources.files(SHIPPED) / f"{name}.yaml"
    raise ConfigError(f"study file: {path_or_name} is neither a file nor a shipped study; shipped ones run by name: "
                      f"{', '.join(shipped())}")


def load(path_or_name: str | Path) -> Study:
    """The study file at ``path_or_name``, or the shipped study of that name, checked (``parse``)."""
    path = find(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"study file {path}: not valid YAML ({exc})") from None
    return parse(raw, where=str(path))


def parse(raw, where: str = "study") -> Study:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a study file is a mapping with name and optimizers, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Study)} - {"spaces", "source"} | {"optimizers"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    for key in ("name", "optimizers"):
        if key not in raw:
            raise ConfigError(f"{where}: {key} is required")
    spaces = _spaces(raw["optimizers"], where)
    study = Study(
        name=_name(raw["name"], where), spaces=spaces, objective=raw.get("objective"),
        direction=_choice(raw.get("direction", "minimize"), ("minimize", "maximize"), f"{where}: direction"),
        n_trials=_positive_int(raw.get("n_trials", 20), f"{where}: n_trials"),
        seeds=tuple(_seeds(raw.get("seeds", [0]), where)),
        sampler=_component(raw.get("sampler", {"name": "tpe", "seed": 0}), SAMPLERS, f"{where}: sampler"),
        pruner=_component(raw.get("pruner", {"name": "median"}), PRUNERS, f"{where}: pruner"),
        enqueue_defaults=bool(raw.get("enqueue_defaults", True)),
        overrides=tuple(str(o) for o in raw.get("overrides") or ()),
        population=_positive_int(raw.get("population", 1), f"{where}: population"), source=raw)
    if study.sampler["name"] == "grid":
        _check_grid(study, where)
    else:
        _check_categoricals(study, where)
    return study


def _check_categoricals(study: Study, where):
    """Outside a grid a list is a categorical choice, and Optuna needs one set of choices per param name."""
    seen = {}
    for space in study.spaces.values():
        for p in list(space.params) + [p for ps in (space.bounds or {}).values() for p in ps]:
            if p.choices is None:
                continue
            first = seen.setdefault(p.name, (space.optimizer, p.choices))
            if first[1] != p.choices:
                raise ConfigError(f"{where}: optimizers.{first[0]} and optimizers.{space.optimizer} list different "
                                  f"values for {p.name}; with sampler {study.sampler['name']} a list is a "
                                  f"categorical choice that must be the same wherever it appears (or use a range)")


def _name(value, where):
    if not (isinstance(value, str) and value and all(c.isalnum() or c in "-_." for c in value)):
        raise ConfigError(f"{where}: name must be letters, digits, '-', '_' or '.', got {value!r}")
    return value


def _choice(value, choices, key):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _positive_int(value, key):
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{key} must be an integer > 0, got {value!r}")
    return value


def _seeds(value, where):
    if isinstance(value, int) and not isinstance(value, bool):
        return list(range(_positive_int(value, f"{where}: seeds")))
    if not (isinstance(value, list) and value and all(isinstance(s, int) for s in value)):
        raise ConfigError(f"{where}: seeds must be a count or a non-empty list of integers, got {value!r}")
    return value


def _component(value, names, key):
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{key} must be a name or a mapping with name, got {value!r}")
    _choice(value["name"], names, f"{key}.name")
    return dict(value)


def _spaces(raw, where) -> dict[str, Space]:
    if not (isinstance(raw, dict) and raw):
        raise ConfigError(f"{where}: optimizers must map optimizer names to search spaces, got {raw!r}")
    spaces = {}
    for opt, space in raw.items():
        key = f"{where}: optimizers.{opt}"
        if opt not in optim.NAMES:
            raise ConfigError(f"{key}: unknown optimizer; valid names: {', '.join(optim.NAMES)}")
        space = space or {}
        if not isinstance(space, dict):
            raise ConfigError(f"{key} must map hyperparameters to ranges or lists, got {space!r}")
        accepted = set(optim.defaults(opt))
        if "betas" in accepted:  # searched one at a time
            accepted |= {"beta1", "beta2"}
        params = []
        for name, spec in space.items():
            if name == "bound":
                continue
            if "." in name and not name.startswith("bound."):  # a config key by its path (bounds: under bound)
                params.append(_param(name, spec, f"{key}.{name}"))
                continue
            if name not in HPARAMS:
                raise ConfigError(f"{key}.{name}: not a searchable hyperparameter; valid: {', '.join(HPARAMS)}, or "
                                  "any other config key by its dotted path (e.g. data.order)")
            if name not in accepted:
                raise ConfigError(f"{key}.{name}: {opt} has no {name}")
            params.append(_param(name, spec, f"{key}.{name}"))
        bounds = _bounds(opt, space.get("bound"), key)
        spaces[opt] = Space(opt, tuple(params), bounds)
    return spaces


def _bounds(opt, raw, key):
    if raw is None:
        return None
    if "bound" not in optim.defaults(opt):
        raise ConfigError(f"{key}.bound: only adabound and amsbound have bound schedules")
    if isinstance(raw, list):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}.bound must list schedules or map them to their spaces, got {raw!r}")
    out = {}
    for name, params in raw.items():
        if name not in SCHEDULES:
            raise ConfigError(f"{key}.bound.{name}: unknown schedule; valid: {', '.join(SCHEDULES)}")
        out[name] = tuple(_param(f"bound.{p}", spec, f"{key}.bound.{name}.{p}") for p, spec in (params or {}).items())
    return out


def _param(name, spec, key) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{key}: a list of values must not be empty")
        return Param(name, choices=tuple(spec))
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Param(name, choices=(spec,))
    if not (isinstance(spec, dict) and {"low", "high"} <= set(spec)):
        raise ConfigError(f"{key} must be a list of values or {{low, high[, log, int]}}, got {spec!r}")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
        raise ConfigError(f"{key}: low < high must hold, got low={low!r}, high={high!r}")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0, got low={low!r}")
    return Param(name, float(low), float(high), log, bool(spec.get("int", False)))


def _check_grid(study: Study, where):
    for space in study.spaces.values():
        every = list(space.params) + [p for ps in (space.bounds or {}).values() for p in ps]
        ranged = [p.name for p in every if p.choices is None]
        if ranged:
            raise ConfigError(f"{where}: sampler grid needs lists of values, but optimizers.{space.optimizer}."
                              f"{ranged[0]} is a range")
