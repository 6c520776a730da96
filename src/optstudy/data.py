"""Datasets, as (train, val) tensor pairs. The default, scikit-learn's digits, is embedded: no download."""

from __future__ import annotations

import torch

from optstudy.errors import ConfigError


def digits(val_fraction: float, seed: int):
    """8x8 digit images flattened to 64 features scaled to [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


DATASETS = {"digits": digits}


def load(cfg, seed: int):
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[cfg.name](cfg.val_fraction, seed)
