"""Embedded datasets: no file, no download."""

from __future__ import annotations

import contextlib
import functools
import random

import numpy as np
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


def positive_int(key: str, value, allow_none: bool = False):
    """``value`` unchanged if it is an int >= 1 (or None when allowed); else a ConfigError naming ``data.<key>``."""
    if value is None and allow_none:
        return None
    # bool is an int subclass, but `limit: true` is a typo, not a count
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = "a positive integer or null" if allow_none else "a positive integer"
        raise ConfigError(f"data.{key} must be {rule}, got {value!r}")
    return value


def mnist1d(seed: int, num_samples: int = 5000) -> Data:
    """MNIST-1D (Greydanus 2020): length-40 signals of 10 digit templates, generated from the run's ``seed``.

    Built with ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads), with the package's other
    defaults and its own split: the first 80% of the ``num_samples`` shuffled examples (rounded down to a multiple of
    10) train, the rest validate. x is float32 (40,), standardised by the package over the whole set.
    """
    # the package makes num_samples // 10 examples of each digit
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ConfigError(f"data.num_samples must be an integer >= 10 (one example per class), got {num_samples!r}")
    return _mnist1d(seed, num_samples)


@functools.lru_cache(maxsize=16)
def _mnist1d(seed: int, num_samples: int) -> Data:
    """Kept per process: making one costs 1.5-4 s, a study worker trains many runs of the same seeds, and a
    population needs one per seed (ten seeds: 15-40 s of each population's set-up). Nothing writes to them."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    with _global_rng_kept():
        d = make_dataset(args)
    return Data(_tensors(d["x"], d["y"]), _tensors(d["x_test"], d["y_test"]), "classification", (40,), 10)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


@contextlib.contextmanager
def _global_rng_kept():
    """Restores Python's and NumPy's global RNG state on exit.

    ``make_dataset`` reseeds both globally (``mnist1d.utils.set_seed``); without this, loading the data would undo the
    run's own seeding and every run would draw the same NumPy numbers afterwards.
    """
    state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


DATASETS = {"digits": digits, "mnist1d": mnist1d}
