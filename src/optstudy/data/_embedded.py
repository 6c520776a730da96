"""Embedded datasets: no file, no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from optstudy.data import Data
from optstudy.errors import ConfigError


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int):
    """``(train, val)`` TensorDatasets from a seeded permutation."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def digits(seed: int, val_fraction: float = 0.2) -> Data:
    """scikit-learn's 1797 8x8 digit images as (1, 8, 8) tensors scaled to [0, 1], 10 classes."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    train, val = split(x, torch.as_tensor(y, dtype=torch.long), val_fraction, seed)
    return Data(train, val, "classification", (1, 8, 8), 10)


DATASETS = {"digits": digits}
