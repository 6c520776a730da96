"""Fully connected models over flattened inputs."""

from __future__ import annotations

import math

from torch import nn

from optstudy.models._norm import check_options, initialise


def mlp(data, hidden=(64,), batch_norm=False, init="default", init_std=0.1) -> nn.Module:
    """Linear-ReLU layers of widths ``hidden``, then a linear output layer.

    ``batch_norm=True`` puts a ``BatchNorm1d`` between each hidden Linear and its ReLU (Ioffe & Szegedy 2015 normalise
    the pre-activation). The Linear layers keep their bias (redundant before BN, but their initial weights are then
    the same draws as without BN under one seed: the comparison is paired). ``init``: see ``_norm.INITS`` (``default``
    is PyTorch's; ``normal``: weights N(0, init_std²), biases 0, the "simple init" of Neelakantan et al. 2015's deep
    MLPs; ``zero``: every weight and bias 0, their "bad init"). ``hidden: [50]*20`` with ``init: normal`` is that
    paper's 20-layer setting.
    """
    check_options(batch_norm, init, init_std)
    layers, width = [nn.Flatten()], math.prod(data.shape)
    for h in hidden:
        layers += [nn.Linear(width, h), *([nn.BatchNorm1d(h)] if batch_norm else []), nn.ReLU()]
        width = h
    return initialise(nn.Sequential(*layers, nn.Linear(width, data.n_classes)), init, init_std)


def logreg(data) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(data.shape), data.n_classes))


MODELS = {"mlp": ("classification", mlp), "logreg": ("classification", logreg)}
