"""Composing and checking ``train.py``'s config: the one way in for ``train.py``, the study worker, scripts and tests.

A mistake anywhere in the overrides or the composed config becomes a ``ConfigError`` naming the key, the rule and the
value, found before any data, model, tracking run or heavy import (the optimizer core, which checks the optimizer's
hyperparameters, imports torch only): ``python train.py optimzer=sgd`` answers in about two seconds that
``optimzer`` is not a key (did you mean ``optimizer``?) instead of Hydra's advice to add it with ``+``.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from optstudy.errors import ConfigError

OURS = "optstudy._conf"  # the repository's conf/, installed as this package (setup.py maps it)
EXTRA_KEYS = ("result_file",)  # set by a study for a train.py subprocess (+result_file=...)


# --- where configs come from ------------------------------------------------------------------------------------
def user_dir(config_dir: str | os.PathLike) -> Path:
    """``--config-dir``, absolute; a ``ConfigError`` listing the directories that do exist if it is not one."""
    path = Path(config_dir).expanduser().absolute()
    if path.is_dir():
        return path
    parent = next(p for p in path.parents if p.is_dir())
    there = sorted(d.name for d in parent.iterdir() if d.is_dir() and not d.name.startswith("."))
    raise ConfigError(f"--config-dir: must be a directory of config groups (e.g. model/mynet.yaml), got {config_dir} "
                      f"which {'is a file' if path.exists() else 'does not exist'}; directories in {parent}: "
                      f"{', '.join(there[:20]) or 'none'}")


def trees(config_dir: str | os.PathLike | None = None) -> list:
    """The config trees composing searches, in Hydra's order: ours (a package resource, so an installed optstudy
    finds them from any directory), then the user's ``config_dir``."""
    from importlib import resources

    ours = resources.files(OURS)
    if not config_dir:
        return [ours]
    theirs = user_dir(config_dir)
    _refuse_shadowed(theirs, ours)
    return [ours, theirs]


def _refuse_shadowed(theirs: Path, ours) -> None:
    """A user file at one of our paths would never be read (Hydra takes the first match, ours): refused, not
    silently ignored."""
    for path in sorted(theirs.rglob("*.yaml")):
        relative = path.relative_to(theirs)
        if ours.joinpath(*relative.parts).is_file():
            raise ConfigError(f"--config-dir: {relative} is also one of optstudy's configs, which would be used "
                              f"instead of yours ({path}); give yours another name, e.g. "
                              f"{relative.with_name('my_' + relative.name)}")


def groups(config_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Config groups and their choices, ours and the user's: ``{"optimizer": ["adabound", ...], ...}``."""
    found: dict[str, set[str]] = {}
    for tree in trees(config_dir):
        for group in tree.iterdir():
            if group.is_dir() and not group.name.startswith(("_", ".")):  # not __pycache__
                found.setdefault(group.name, set()).update(
                    f.name[:-5] for f in group.iterdir() if f.name.endswith(".yaml"))
    return {name: sorted(choices) for name, choices in sorted(found.items())}


def top_keys() -> list[str]:
    """The keys ``train.yaml`` has besides its groups (``seed``, ``objective``, ...)."""
    from importlib import resources

    own = yaml.safe_load((resources.files(OURS) / "train.yaml").read_text())
    return sorted({*own, *EXTRA_KEYS} - {"defaults", "hydra"})


def search_path(config_dir: str | os.PathLike | None = None) -> list[str]:
    """The Hydra override that puts the user's directory on the search path behind ours, where Hydra's own
    ``--config-dir`` puts it: their ``model/mynet.yaml`` is ``model=mynet``. Checked: it exists, shadows nothing."""
    if not config_dir:
        return []
    quoted = str(trees(config_dir)[1]).replace("\\", "\\\\").replace("'", "\\'")  # a path with , or spaces
    return [f"hydra.searchpath=['file://{quoted}']"]


def _closest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_overrides(overrides: list[str], config_dir: str | os.PathLike | None = None) -> None:
    """Every override names a group and one of its choices, or a key that exists (``+`` adds one below a group)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"overrides: {str(exc).splitlines()[0]}") from None
    choices, keys = groups(config_dir), top_keys()
    for override in parsed:
        key = override.key_or_group
        head = key.split(".")[0].split("/")[0]
        if head == "hydra":
            continue
        if head not in choices and head not in keys:
            raise ConfigError(
                f"{key}: not a config group or key of train.py{_closest(head, [*choices, *keys])}; "
                f"groups: {', '.join(choices)}; keys: {', '.join(keys)}"
            )
        value = override.value() if not override.is_delete() else None
        if key in choices and isinstance(value, str) and value not in choices[key] and value != "null":
            raise ConfigError(f"{key}={value}: no such {key}{_closest(value, choices[key])}; "
                              f"choices: {', '.join(choices[key])}")


def compose(overrides: list[str], config_dir: str | os.PathLike | None = None) -> DictConfig:
    """``train.yaml`` with ``overrides``, as ``train.py`` and ``optstudy train`` compose it (Hydra's node included,
    so that code asking Hydra for its run directory gets answers); every mistake a ``ConfigError``. The one way in:
    every entry point composes here. ``config_dir``: the user's config groups, searched after ours."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    overrides = list(overrides)
    check_overrides(overrides, config_dir)
    search = search_path(config_dir)
    with initialize_config_module(config_module=OURS, version_base="1.3"):
        def composed(chosen: list[str], **kw) -> DictConfig:
            return hydra_compose(config_name="train", overrides=[*chosen, *search], **kw)

        try:
            cfg = composed(overrides, return_hydra_config=True)
        except HydraException as exc:
            raise _missing_key(overrides, composed, groups(config_dir)) or ConfigError(
                "overrides: " + " ".join(str(exc).split())) from None
        HydraConfig.instance().set_config(cfg)
    return cfg


def _missing_key(overrides: list[str], composed, choices: dict) -> ConfigError | None:
    """The error for the first override that changes a key its config lacks (Hydra would advise ``+``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    base = composed([o.input_line for o in parsed if o.key_or_group in choices])
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or key in choices or "." not in key:
            continue
        parent, leaf = key.rsplit(".", 1)
        node = OmegaConf.select(base, parent)
        if isinstance(node, DictConfig) and leaf not in node:
            return ConfigError(f"{key}: {parent} has no key {leaf!r}{_closest(leaf, node)}; "
                               f"its keys: {', '.join(map(str, node))}")
    return None


# --- the composed config ----------------------------------------------------------------------------------------
def optimizer_kwargs(cfg: DictConfig | dict, notes: bool = True) -> dict:
    """The optimizer's name and keywords from ``cfg.optimizer`` (and ``cfg.bound`` for the bounded ones)."""
    from optstudy import optim

    hp = _plain(cfg["optimizer"])  # a config, or a plain dict (a population's members)
    name = hp.pop("name")
    # an experiment sets e.g. betas for Adam; switching to SGD on the command line keeps them. A hyperparameter of
    # another core optimizer is dropped with a note; anything else still fails in optim.build as unknown
    others = {k for n in optim.NAMES for k in optim.defaults(n)} - set(optim.defaults(name))
    for key in sorted(others & set(hp)):
        value = hp.pop(key)
        if notes:
            print(f"note: optimizer {name} has no {key}; ignoring optimizer.{key}={value}", flush=True)
    if isinstance(hp.get("betas"), list):
        hp["betas"] = tuple(hp["betas"])
    if "grad_noise" in hp:  # gradient noise (optim._noise), seeded with the run's seed unless it names its own
        from optstudy.optim import _noise

        hp["grad_noise"] = _noise.from_config(hp["grad_noise"], cfg["seed"])
    if "bound" in optim.defaults(name) and "bound" in cfg:
        hp.setdefault("bound", _plain(cfg["bound"]))
    return {"name": name, **hp}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else copy.deepcopy(node)


def _integer(cfg: DictConfig, key: str, low: int, high: int | None = None) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        rule = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def validate(cfg: DictConfig, overrides: list[str] = ()) -> None:
    """Checks the whole composed config: each value where it enters, before anything is loaded or recorded.
    ``overrides``: the command line's, to refuse options that the choices made would silently ignore."""
    from optstudy import optim

    _integer(cfg, "seed", 0, 2**32 - 1)  # numpy's seed range, which Lightning seeds too
    _integer(cfg, "data.batch_size", 1)
    from optstudy.data import _order

    _order.check(cfg.data)  # data.order and data.curriculum.* (the scores come once the data is loaded)
    if OmegaConf.select(cfg, "trainer.max_epochs") is not None:
        _integer(cfg, "trainer.max_epochs", 0)
    from optstudy import delay

    delay.check(cfg)  # trainer.delay: an integer >= 0 or a distribution's parameters
    from optstudy import early

    early.settings(cfg)  # trainer.early_stopping's values (its monitor is checked once the task's metrics are known)
    if OmegaConf.select(cfg, "logger.eff_lr_every_n_steps") is not None:
        _integer(cfg, "logger.eff_lr_every_n_steps", 1)
    draw = OmegaConf.select(cfg, "logger.eff_lr_heatmap")
    if draw is not None and not isinstance(draw, bool):
        raise ConfigError(f"logger.eff_lr_heatmap must be true or false, got {draw!r}")
    wait = OmegaConf.select(cfg, "logger.outage_wait")
    if wait is not None and not (isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait >= 0):
        raise ConfigError(f"logger.outage_wait must be a number of seconds >= 0, got {wait!r}")
    factor = OmegaConf.select(cfg, "divergence.factor")
    if factor is not None and not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1):
        raise ConfigError(f"divergence.factor must be a number > 1 or null (NaN/inf only), got {factor!r}")
    kwargs = optimizer_kwargs(cfg, notes=False)  # training prints them
    name = kwargs.pop("name")
    explicit = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "bound" not in optim.defaults(name) and "bound" in explicit:
        bounded = [n for n in optim.NAMES if "bound" in optim.defaults(n)]
        raise ConfigError(f"bound={cfg.bound.name}: optimizer {name} has no learning-rate bounds, so it would be "
                          f"ignored; bounds are for {', '.join(bounded)}")
    optim.check(name, **kwargs)  # every hyperparameter's rule, as optim.build applies them
    from optstudy.models import check_targets

    check_targets(cfg)  # a model's or data's _target_ imports, its keys are valid (the data is not loaded yet)
    from optstudy import parallel

    parallel.check(cfg)  # trainer=hogwild|downpour|easgd: their values, and what they cannot do (populations)
    from optstudy.population import members

    if members.active(cfg):
        members.check(cfg)  # each member's values, as its standalone run checks them
    check_tracking(cfg)


class TrackingUnreachable(ConfigError):
    """No MLflow server answers at the configured tracking URI."""


def check_tracking(cfg: DictConfig, timeout: float = 5.0) -> None:
    """An MLflow server that does not answer, or refuses, is an error now, not minutes of urllib3 retries ending in
    a traceback. Asks its ``/health`` endpoint, once (a SQLite store needs no check)."""
    if OmegaConf.select(cfg, "logger.name") != "mlflow":
        return
    key, uri = "logger.tracking_uri", OmegaConf.select(cfg, "logger.tracking_uri")
    if not uri:
        key, uri = "MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        reason = f"it answered HTTP {exc.code} to /health"
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingUnreachable(f"{key}: no MLflow tracking server answers at {uri} ({reason}); start it (mlflow "
                              f"server --host ... --port ...), correct {key}, or train with logger=none")
