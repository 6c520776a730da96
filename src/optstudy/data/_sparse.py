"""The ``sparse`` dataset: sparse binary features and a planted linear rule, for sparse logistic regression (the
problem of Hogwild!'s claim: updates that touch few coordinates rarely collide)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from optstudy.data import Data
from optstudy.data._embedded import positive_int, split


def sparse(seed: int, n: int = 20000, features: int = 10_000, active: int = 10, noise: float = 0.05,
           val_fraction: float = 0.2) -> Data:
    """``n`` examples, each ``active`` distinct-ish feature indices out of ``features`` (uniform, with value 1: x is
    the ``(active,)`` long tensor of its indices), labelled by a planted rule y = 1[Σ_j w*_{x_j} > 0] with w* ~ N(0, 1)
    per feature, each label flipped with probability ``noise``. Two classes. Generated from ``seed``; split as the
    embedded datasets are (``val_fraction``)."""
    positive_int("n", n)
    positive_int("features", features)
    positive_int("active", active)
    if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and 0 <= noise < 0.5):
        from optstudy.errors import ConfigError

        raise ConfigError(f"data.noise must be a number in [0, 0.5), got {noise!r}")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(features, generator=gen)  # the planted rule
    x = torch.randint(0, features, (n, active), generator=gen)
    y = (w[x].sum(1) > 0).long()
    flip = torch.rand(n, generator=gen) < noise
    y = torch.where(flip, 1 - y, y)
    train, val = split(x, y, val_fraction, seed)
    return Data(TensorDataset(*train.tensors), TensorDataset(*val.tensors), "classification", (active,), 2)


DATASETS = {"sparse": sparse}
