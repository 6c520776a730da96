"""A model of the user's own: a ``model`` config whose ``_target_`` names any importable callable returning an
``nn.Module``, called (through Hydra's ``instantiate``) with the config's other keys but ``name`` and ``task``.

    # conf/model/mynet.yaml
    _target_: mypkg.nets.WideResNet
    task: classification        # the default; or language_model, objective (optstudy.models' contracts)
    depth: 16
    num_classes: ${data.n_classes}   # data.task, data.n_classes, data.shape are filled when the data loads

``check_config`` (in ``optstudy.config.validate``, before any data) imports the target; ``build`` calls it once the
data is loaded and runs one forward of 2 validation examples, so that a module of the wrong kind or with outputs of
the wrong shape for the task is named before training, not deep inside Lightning.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import default_collate

from optstudy.data import TASKS
from optstudy.data import _target as targets
from optstudy.errors import ConfigError

OURS = ("name", "task", "_target_")  # never passed to the target
OBJECTIVE_METHODS = ("val_loss", "metrics", "project_")


def check_config(cfg: DictConfig) -> None:
    """The targets of ``model`` and ``data`` importable and callable, their own keys valid, and the data's keys a
    model config may interpolate present (null until the data loads). Needs no data."""
    from optstudy.models import names

    targets.check_config(cfg)
    model = cfg.get("model")
    if not (targets.has_target(model) or targets.has_target(cfg.get("data"))):
        return
    targets.add_placeholders(cfg)
    if targets.has_target(model):
        targets.check_target("model", model, names())
        task = model.get("task", "classification")
        if task not in TASKS:
            raise ConfigError(f"model.task must be one of {', '.join(TASKS)}, got {task!r}")
    targets.plain(model)  # an interpolation that cannot resolve is named now


def build(cfg, data) -> nn.Module:
    """The module ``cfg._target_`` returns for ``data``, checked against the task's contract."""
    path = cfg["_target_"]
    task = cfg.get("task") or "classification"
    if task != data.task:
        raise ConfigError(f"model.task: {path} is a {task} model, but the dataset is a {data.task} task; set "
                          f"model.task={data.task} if it is one")
    params = {k: v for k, v in targets.plain(cfg).items() if k not in OURS}
    model = targets.call("model._target_", path, params)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_: {path} returned a {type(model).__name__}, not a torch.nn.Module")
    check_outputs(model, data, path)
    return model


def check_outputs(model: nn.Module, data, path: str) -> None:
    """One forward of (up to) 2 validation examples as training makes it (train mode, no gradient), on a copy and
    with the RNG state restored: the run then starts exactly as it would without the check."""
    n = min(2, len(data.val))
    batch = default_collate([data.val[i] for i in range(n)])
    inputs = batch if data.task == "objective" else batch[0]
    probe = copy.deepcopy(model)
    shown = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = probe(inputs)
    except Exception as exc:  # noqa: BLE001  (the user's forward may raise anything)
        raise ConfigError(f"model._target_: {path}'s forward failed on a batch of {n} validation inputs of shape "
                          f"{shown}: {targets.one_line(exc)}") from None
    _check_output(probe, out, data, path, f"a batch of {n} validation inputs of shape {shown}")


def _check_output(probe: nn.Module, out, data, path: str, given: str) -> None:
    if data.task == "objective":
        missing = [m for m in OBJECTIVE_METHODS if not callable(getattr(probe, m, None))]
        if missing or not (isinstance(out, torch.Tensor) and out.dim() == 0):
            got = _what(out) if not missing else f"no {', '.join(missing)}()"
            raise ConfigError(f"model._target_: {path} must be an objective (forward(batch) returns the scalar "
                              f"loss; val_loss(), metrics() and project_() methods), got {got}")
        return
    n = min(2, len(data.val))
    want = (n, data.n_classes) if data.task == "classification" else (n, data.val[0][0].shape[0], data.n_classes)
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) == want):
        layout = "(batch, n_classes)" if data.task == "classification" else "(batch, bptt, vocabulary)"
        raise ConfigError(f"model._target_: {path} maps {given} to {_what(out)}; a {data.task} model must give "
                          f"{layout} = {want} float logits (data.n_classes is {data.n_classes})")


def _what(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a {out.dtype} tensor of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"
