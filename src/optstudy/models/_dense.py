"""Fully connected models over flattened inputs."""

from __future__ import annotations

import math

from torch import nn


def mlp(data, hidden=(64,)) -> nn.Module:
    layers, width = [nn.Flatten()], math.prod(data.shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, data.n_classes))


def logreg(data) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(data.shape), data.n_classes))


MODELS = {"mlp": ("classification", mlp), "logreg": ("classification", logreg)}
