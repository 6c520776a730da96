"""Models by name: ``build(cfg, data)`` with ``cfg`` the ``model`` config group and ``data`` an ``optstudy.data.Data``.

- classification models map a batch of ``data.shape`` inputs to ``(batch, data.n_classes)`` logits;
- language models map ``(batch, bptt)`` token ids to ``(batch, bptt, vocabulary)`` logits;
- objective models (synthetic problems) *are* the loss: ``forward(batch)`` returns the scalar training loss, and they
  have ``val_loss()`` (the noise-free objective), ``metrics()`` (a dict of floats logged every step, e.g. the iterate
  ``x``) and ``project_()`` (called after every optimizer step, e.g. to clip to a feasible set; may do nothing).

A config with ``_target_`` instead of a built-in ``name`` is a model of the user's own (``optstudy.models._target``):
any callable returning an ``nn.Module`` for ``model.task`` (default classification), held to the same contract.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from optstudy.errors import ConfigError


def _registry() -> dict[str, tuple[str, Callable[..., nn.Module]]]:
    """name -> (task, factory(data, **params))"""
    from optstudy.models import _dense, _lm, _sparse, _synthetic, _vision

    return {**_dense.MODELS, **_vision.MODELS, **_lm.MODELS, **_synthetic.MODELS, **_sparse.MODELS}


def names() -> tuple[str, ...]:
    return tuple(_registry())


def check_targets(cfg) -> None:
    """A ``_target_`` in ``cfg.model`` or ``cfg.data`` imports and is callable, and their keys are valid; needs no
    data (``optstudy.config.validate`` calls it). Adds null ``data.task|n_classes|shape`` for interpolations."""
    from optstudy.models import _norm, _target

    _target.check_config(cfg)
    model = cfg.get("model")
    if model is not None and model.get("name") in ("mlp", "cnn"):  # batch_norm and init, before the data loads
        _norm.check_options(model.get("batch_norm", False), model.get("init", "default"), model.get("init_std", 0.1))


def label(cfg) -> str:
    """What names the model in tags and lines: ``name``, else the ``_target_`` (a model of the user's own)."""
    return cfg.get("name") or cfg.get("_target_")


def build(cfg, data) -> nn.Module:
    """The model ``cfg`` names (``name``, or ``_target_``) for ``data``, an ``optstudy.data.Data``."""
    from optstudy.models import _target

    if _target.targets.has_target(cfg):
        return _target.build(cfg, data)
    registry = _registry()
    if cfg.name not in registry:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; valid names: {', '.join(registry)}")
    task, factory = registry[cfg.name]
    if task != data.task:
        fits = ", ".join(n for n, (t, _) in registry.items() if t == data.task)
        raise ConfigError(f"model.name: model {cfg.name!r} is for {task} data, but the dataset is a {data.task} "
                          f"task; models for it: {fits}")
    params = {k: v for k, v in cfg.items() if k != "name"}
    return factory(data, **params)
