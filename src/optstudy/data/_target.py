"""Data of the user's own: a ``data`` config whose ``_target_`` names any importable callable returning

- an ``optstudy.data.Data``, used as it is;
- a ``(train, val)`` pair of torch ``Dataset`` s (anything with ``len`` and ``[i]``);
- a ``LightningDataModule`` (``prepare_data()`` and ``setup("fit")`` are called; its ``train_dataloader()`` and
  ``val_dataloader()`` train and validate, so its batch size, collate and order apply, not ``data.batch_size``).

    # conf/data/mydata.yaml
    _target_: mypkg.data.make   # called with the keys below that are not ours, and seed= when it takes a seed
    size: 1000
    batch_size: 64              # ours (a DataModule batches itself)
    task: null                  # classification | language_model | objective; null: inferred
    n_classes: null             # classes (vocabulary size for a language model); null: inferred from the labels

The task is inferred from the first training item: ``(x, y)`` with ``x`` a float tensor and ``y`` an integer class is
classification (``shape`` is ``x.shape``, ``n_classes`` the largest label of both splits + 1), two integer tensors of
one shape a language model (``n_classes``: the largest token + 1); an objective's steps must be declared
(``task: objective``). A DataModule's datasets are its loaders' ``dataset``.

Once loaded, ``record`` writes ``data.task``, ``data.n_classes`` and ``data.shape`` into the config, so that a model
config interpolates them (``num_classes: ${data.n_classes}``) and MLflow records them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import random

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from optstudy.errors import ConfigError

# never passed to a target
OURS = ("name", "batch_size", "num_workers", "task", "n_classes", "shape", "order", "curriculum")
FILLED = ("task", "n_classes", "shape")  # what the loaded data tells the config


# --- targets in general (models use these too) ----------------------------------------------------------------------
def has_target(node) -> bool:
    """Whether a config node names a ``_target_`` (also while its value is still ``???``)."""
    return node is not None and "_target_" in node.keys()  # noqa: SIM118  (`in` is False for a ??? value)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def check_target(group: str, node, builtin: tuple[str, ...]) -> object:
    """``<group>._target_`` names an importable callable, and ``<group>.name`` (a label then) no built-in choice;
    returns the callable. Needs no data: ``optstudy.config.validate`` runs it."""
    key = f"{group}._target_"
    if OmegaConf.is_config(node) and OmegaConf.is_missing(node, "_target_"):
        raise ConfigError(f"{key} must name an importable callable (e.g. {group}._target_=mypkg.module.Name), got "
                          f"??? (unset)")
    name = node.get("name")
    if name in builtin:  # e.g. model=mlp +model._target_=...: mlp's own keys would be passed to the target
        raise ConfigError(f"{group}.name: {name!r} is a built-in {group}, but {key} is set too, so its keys would go "
                          f"to {node['_target_']}; start from {group}=custom (or ~{group}), or label it otherwise")
    target = locate(key, node["_target_"])
    if not callable(target):
        raise ConfigError(f"{key} must name a callable, got {node['_target_']!r} (a {type(target).__name__})")
    return target


def locate(key: str, path) -> object:
    """The object the dotted ``path`` names, importing its modules; a ``ConfigError`` naming ``key`` if it cannot."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{key} must be a dotted path module.name of an importable callable, got {path!r}")
    parts = path.split(".")
    obj = _import(key, path, parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if inspect.ismodule(obj):  # a submodule not imported yet
            with contextlib.suppress(_NotFound):
                obj = _import(key, path, ".".join(parts[: i + 1]))
                continue
        options = [n for n in dir(obj) if not n.startswith("_")]
        close = difflib.get_close_matches(part, options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: cannot import {path!r}: {'.'.join(parts[:i])} has no attribute {part!r}{hint}")
    return obj


class _NotFound(ConfigError):
    """The module itself does not exist (one of its own imports failing is another error)."""


def _import(key: str, path: str, module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # the module exists, but something it imports does not
            raise ConfigError(f"{key}: cannot import {path!r}: importing {module} raised {one_line(exc)}") from None
        # python puts the script's folder on sys.path, not the current directory
        raise _NotFound(f"{key}: cannot import {path!r}: no module named {module!r} (is its folder on "
                        f"PYTHONPATH?)") from None
    except Exception as exc:  # noqa: BLE001  (a user's module may raise anything on import)
        raise ConfigError(f"{key}: cannot import {path!r}: importing {module} raised {one_line(exc)}") from None


def call(key: str, path: str, params: dict, **extra):
    """``path(**params, **extra)`` through Hydra's ``instantiate`` (nested ``_target_``, ``_args_``, ``_partial_``;
    containers passed as plain lists and dicts); a failure is a ``ConfigError`` naming ``key`` and the call."""
    from hydra.utils import instantiate

    try:
        return instantiate({"_target_": path, "_convert_": "all", **params}, **extra)
    except Exception as exc:  # noqa: BLE001  (Hydra wraps the target's own exception as the cause)
        shown = ", ".join(f"{k}={v!r}" for k, v in {**params, **extra}.items() if not k.startswith("_"))
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        raise ConfigError(f"{key}: calling {path}({shown}) failed: {one_line(exc.__cause__ or exc)}") from None


def plain(node) -> dict:
    """A config node as a resolved plain dict; an interpolation that does not resolve is a ``ConfigError``."""
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.is_config(node):
        return dict(node)
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as exc:
        where = exc.full_key or "config"
        raise ConfigError(f"{where}: {str(exc).splitlines()[0]}; the data fills data.{', data.'.join(FILLED)} "
                          f"when it loads") from None


# --- the data config ------------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """``data._target_`` importable and callable, ``data.task`` and ``data.n_classes`` valid where declared."""
    from optstudy.data import TASKS, names

    node = cfg.get("data")
    if not has_target(node):
        return
    check_target("data", node, names())
    task = node.get("task")
    if task is not None and task not in TASKS:
        raise ConfigError(f"data.task must be one of {', '.join(TASKS)} or null (inferred), got {task!r}")
    n = node.get("n_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"data.n_classes must be a positive integer or null (inferred), got {n!r}")


def add_placeholders(cfg: DictConfig) -> None:
    """``data.task``, ``data.n_classes``, ``data.shape`` as null where absent, so that ``${data.n_classes}`` in a
    model config resolves (to null) wherever the whole config is resolved before the data loads (a population's
    member configs, a study's identity); ``record`` fills them."""
    with open_dict(cfg.data):
        for key in FILLED:
            if key not in cfg.data:
                cfg.data[key] = None


def record(cfg, data) -> None:
    """Writes what the loaded ``data`` gives into ``cfg`` (the ``data`` node) where it has these keys or a target;
    a value declared there that disagrees is an error."""
    if not isinstance(cfg, DictConfig) or not (has_target(cfg) or any(k in cfg for k in FILLED)):
        return  # built-in data in a config without placeholders: unchanged, as ever
    found = {"task": data.task, "n_classes": data.n_classes, "shape": list(data.shape)}
    for key, value in found.items():
        declared = cfg.get(key)
        declared = OmegaConf.to_container(declared) if OmegaConf.is_config(declared) else declared
        if declared is not None and declared != value:
            raise ConfigError(f"data.{key} is declared {declared!r}, but the data gives {value!r}")
    with open_dict(cfg):
        for key, value in found.items():
            cfg[key] = value


# --- loading --------------------------------------------------------------------------------------------------------
def load(cfg, seed: int):
    """The data ``cfg._target_`` returns, called with the keys that are not ours (and ``seed`` if it takes one)."""
    path = cfg["_target_"]
    target = locate("data._target_", path)
    params = {k: v for k, v in plain(cfg).items() if k not in OURS and k != "_target_"}
    extra = {"seed": seed} if _takes_seed(target) and "seed" not in params else {}
    with _rng_kept():
        made = call("data._target_", path, params, **extra)
    return _as_data(made, path, cfg.get("task"), cfg.get("n_classes"))


def _takes_seed(target) -> bool:
    try:
        return "seed" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


@contextlib.contextmanager
def _rng_kept():
    """The global torch, NumPy and Python RNG states restored after the user's factory: if it draws from them, the
    model's initial weights (drawn next) stay those of the seed, and a population's members, which load each seed's
    data once, get their standalone runs' weights."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _as_data(made, path: str, task, n_classes):
    from optstudy.data import Data

    if isinstance(made, Data):
        return made
    if all(callable(getattr(made, m, None)) for m in ("setup", "train_dataloader", "val_dataloader")):
        return _from_datamodule(made, path, task, n_classes)
    if isinstance(made, (tuple, list)) and len(made) == 2 and all(_is_dataset(d) for d in made):
        return _from_pair(made[0], made[1], path, task, n_classes)
    raise ConfigError(f"data._target_: {path} returned {_kind(made)}; it must return an optstudy.data.Data, a "
                      f"(train, val) pair of torch Datasets or a LightningDataModule")


def _is_dataset(d) -> bool:
    return hasattr(d, "__len__") and hasattr(d, "__getitem__")


def _kind(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value[:3])})"
    return f"a {type(value).__name__}"


def _from_datamodule(module, path: str, task, n_classes):
    """The module's loaders' datasets, described as a pair's; the module kept to train and validate."""
    if callable(getattr(module, "prepare_data", None)):
        module.prepare_data()
    module.setup("fit")
    loaders = []
    for which in ("train_dataloader", "val_dataloader"):
        try:
            loaders.append(getattr(module, which)())
        except Exception as exc:  # noqa: BLE001  (Lightning's default raises "must be implemented")
            raise ConfigError(f"data._target_: the LightningDataModule {path} gives no {which}() ({one_line(exc)}); "
                              f"optstudy trains and validates every epoch") from None
    data = _from_pair(loaders[0].dataset, loaders[1].dataset, path, task, n_classes)
    return dataclasses.replace(data, datamodule=module)


def _from_pair(train, val, path: str, task, n_classes):
    from optstudy.data import Data

    for split, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise ConfigError(f"data._target_: {path} returned an empty {split} set")
    item = train[0]
    task = task or _infer_task(item, path)
    if task == "objective":
        return Data(train, val, "objective", (), n_classes or 0)
    if not _fits(item, task):
        raise ConfigError(f"data.task is {task}, but the first training item of {path} is {_describe(item)}; "
                          f"{RULES[task]}")
    shape = tuple(item[0].shape) if task == "classification" else ()
    if n_classes is None:
        n_classes = max(_largest(train, task), _largest(val, task)) + 1
    else:
        _check_labels(train, task, n_classes)
    return Data(train, val, task, shape, n_classes)


RULES = {"classification": "classification items are (x, y), x a float tensor and y an integer class",
         "language_model": "language model items are (x, y), two integer tensors of token ids of one shape"}


def _infer_task(item, path: str) -> str:
    for task in RULES:
        if _fits(item, task):
            return task
    raise ConfigError(f"data.task: cannot infer it from the first training item of {path}, {_describe(item)}: "
                      f"{'; '.join(RULES.values())}; declare data.task (objective for an objective's steps)")


def _fits(item, task: str) -> bool:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
        return False
    x, y = item
    if task == "classification":
        integer = isinstance(y, int) or isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_floating_point()
        return x.is_floating_point() and integer and not isinstance(y, bool)
    return (isinstance(y, torch.Tensor) and x.dim() == 1 and x.shape == y.shape and not x.is_floating_point()
            and not y.is_floating_point())


def _describe(item) -> str:
    def one(v):
        return f"{v.dtype} tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{type(v).__name__} {v!r:.40}"

    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} ({', '.join(one(v) for v in item[:3])})"
    return one(item)


def _labels(ds, task: str, cheap: bool = False) -> list[torch.Tensor] | None:
    """The class labels (every token, for a language model) of ``ds``; with ``cheap``, only when no pass over the
    items is needed (a TensorDataset, a ``targets`` attribute), else None."""
    tensors = getattr(ds, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) == 2:
        return list(tensors) if task == "language_model" else [tensors[1]]
    if task == "classification" and getattr(ds, "targets", None) is not None:
        return [torch.as_tensor(ds.targets)]
    if cheap:
        return None
    return [torch.as_tensor(v) for i in range(len(ds)) for v in (ds[i] if task == "language_model" else ds[i][1:])]


def _largest(ds, task: str) -> int:
    return max(int(t.max()) for t in _labels(ds, task))


def _check_labels(ds, task: str, n_classes: int) -> None:
    labels = _labels(ds, task, cheap=True)
    largest = max(int(t.max()) for t in labels) if labels else -1
    if largest >= n_classes:
        raise ConfigError(f"data.n_classes is {n_classes}, but the training labels go up to {largest}")
