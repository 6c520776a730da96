"""What a population is made of: ``population.*`` in ``train.py``'s config, crossed into K member configs.

    python train.py optimizer=adam 'population.lr=[1e-4,3e-4,1e-3,3e-3]' 'population.seed=[0,1,2]'

Each key of ``population`` that holds a list is crossed with the others (the Cartesian product, seed varying
fastest); a single value is the same for every member, as ``optimizer.<key>=value`` would be. Member k's config is
the one ``python train.py`` would compose for it alone (its values in ``optimizer.*``, ``bound.*``, ``data.order`` and
``seed``, ``population`` back to its defaults), so its MLflow run carries exactly a standalone run's params.
"""

from __future__ import annotations

import copy
import itertools
import numbers

from omegaconf import DictConfig, OmegaConf

from optstudy.errors import ConfigError

BOUND_KEYS = ("gamma", "beta2", "rate", "horizon")  # the bound schedules' parameters (optstudy.optim.bounds)
FLAGS = ("nesterov", "centered", "amsgrad", "amsbound", "decoupled_weight_decay", "maximize", "bias_correction")


def active(cfg: DictConfig) -> bool:
    """Whether ``cfg`` asks for a population (any ``population.*`` value set besides ``shared_order``)."""
    return bool(_choices(cfg))


def _choices(cfg: DictConfig) -> dict[str, list]:
    """``{"optimizer.lr": [...], "bound.rate": [...], "seed": [...]}`` for every value set in ``population``."""
    node = OmegaConf.select(cfg, "population")
    if node is None:
        return {}
    tree = OmegaConf.to_container(node, resolve=True)
    out = {}
    for key, value in tree.items():
        if key == "shared_order" or value is None:
            continue
        if key == "bound":
            out.update({f"bound.{k}": _values(f"bound.{k}", v) for k, v in (value or {}).items() if v is not None})
        elif key == "grad_noise":  # gradient noise's eta, gamma, seed per member (optstudy.optim._noise)
            out.update({f"optimizer.grad_noise.{k}": _values(f"grad_noise.{k}", v)
                        for k, v in (value or {}).items() if v is not None})
        elif key == "seed":
            out["seed"] = _values("seed", value)
        elif key == "order":  # data.order per member (optstudy.data._order); its data.curriculum.* are shared
            out["data.order"] = _values("order", value)
        elif key in FLAGS:
            raise ConfigError(f"population.{key}: flags are shared by a population (one value for every member); "
                              f"run one population per value, e.g. optimizer.{key}={value if not isinstance(value, list) else value[0]}")
        else:
            out[f"optimizer.{key}"] = _values(key, value)
    if "seed" in out:  # the seed varies fastest: members of one configuration sit together
        out["seed"] = out.pop("seed")
    return out


def _values(key: str, value) -> list:
    """A list of the member values of ``key``; a single value (``betas``: a single pair) as a list of one."""
    if key == "betas":
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        return [value]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"population.{key} must be a value or a non-empty list of values, got []")
        return value
    return [value]


def member_dicts(cfg: DictConfig, settings: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """Each member's resolved config as a plain dict (``train.py``'s, Hydra's node left out) and what it sets
    (``{"optimizer.lr": 1e-4, "seed": 0}``): the product of ``population.*``, or the given ``settings`` (a study's
    trials, which are no product; keys may add tags: ``tags.optuna.trial``). Plain dicts: copying a DictConfig takes
    ~6 ms, 0.4 s for 64 members."""
    base = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}
    # population back to train.yaml's defaults, key order kept: a member's config is its standalone run's
    base["population"] = {k: False if k == "shared_order" else {b: None for b in v} if isinstance(v, dict) else None
                          for k, v in base["population"].items()}  # bound, grad_noise: their keys kept
    if settings is None:
        choices = _choices(cfg)
        settings = [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]
    members = []
    for setting in settings:
        member = copy.deepcopy(base)
        for key, value in setting.items():
            *path, leaf = key.split(".")
            node = member
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        members.append(member)
    return members, settings


def member_configs(cfg: DictConfig) -> tuple[list[DictConfig], list[dict]]:
    """``member_dicts`` as configs, each the one ``python train.py`` composes for that member alone."""
    members, settings = member_dicts(cfg)
    return [OmegaConf.create(m) for m in members], settings


def check(cfg: DictConfig, settings: list[dict] | None = None) -> None:
    """Each member's seed and optimizer keywords checked as a standalone run checks them; the message names the
    ``population`` key and the member's value."""
    from optstudy import optim
    from optstudy.config import optimizer_kwargs
    from optstudy.data import _order

    choices = _choices(cfg) if settings is None else {k: [s[k] for s in settings] for k in settings[0]}
    for key, values in choices.items():
        for value in values:
            if key == "seed" and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32):
                raise ConfigError(f"population.seed must be integers in [0, 2**32 - 1], got {value!r}")
            if key.startswith("bound.") and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
                raise ConfigError(f"population.{key} must be numbers, got {value!r}")
    shared = OmegaConf.select(cfg, "population.shared_order")
    if not isinstance(shared, bool):
        raise ConfigError(f"population.shared_order must be true or false, got {shared!r}")
    members, settings = member_dicts(cfg, settings)
    for member, setting in zip(members, settings):
        shown = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in setting.items())
        try:
            _order.check(member["data"])
            kwargs = optimizer_kwargs(member, notes=False)  # checks optimizer.grad_noise's values
        except ConfigError as exc:
            raise ConfigError(f"population member ({shown}): {exc}") from None
        name = kwargs.pop("name")
        unknown = [k.split(".", 1)[1] for k in setting if k.startswith("optimizer.")
                   and k.split(".")[1] not in (*optim.defaults(name), "grad_noise")]
        if unknown:
            raise ConfigError(f"population.{unknown[0]}: optimizer {name} has no keyword {unknown[0]!r}; its "
                              f"keywords: {', '.join(optim.defaults(name))}")
        try:
            optim.check(name, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"population member ({shown}): {exc}") from None


def label(setting: dict) -> str:
    """``lr=0.0001 seed=0``: what a member sets, for progress lines and tables."""
    return " ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in setting.items())


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value)
