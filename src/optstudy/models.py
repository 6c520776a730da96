"""Models by name."""

from __future__ import annotations

from torch import nn

from optstudy.errors import ConfigError


def mlp(n_in: int, n_out: int, hidden=(64,)) -> nn.Module:
    layers, width = [], n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def logreg(n_in: int, n_out: int) -> nn.Module:
    return nn.Linear(n_in, n_out)


MODELS = {"mlp": mlp, "logreg": logreg}


def build(cfg, n_in: int, n_out: int) -> nn.Module:
    params = {k: v for k, v in cfg.items() if k != "name"}
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[cfg.name](n_in, n_out, **params)
