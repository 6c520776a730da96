"""Datasets by name, each returned as a ``Data``: train and validation sets plus what a model needs to know.

Three kinds of task share one training loop (``optstudy.lit``):

- ``classification``: items ``(x, y)``, ``x`` a float tensor of ``Data.shape``, ``y`` a long class index.
- ``language_model``: items ``(x, y)``, two long tensors of ``bptt`` token ids, ``y`` is ``x`` shifted by one;
  ``n_classes`` is the vocabulary size.
- ``objective``: synthetic problems whose model *is* the loss (``optstudy.models``); items are step indices.

Embedded datasets (digits, MNIST-1D, synthetic) need no file; MNIST, Fashion-MNIST, CIFAR-10 and PTB read their
original file formats from ``data.root`` and name the files they expected when these are missing.

A config with ``_target_`` instead of a built-in ``name`` is data of the user's own (``optstudy.data._target``): a
callable returning a ``Data``, a ``(train, val)`` pair of Datasets or a LightningDataModule.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch.utils.data import Dataset

from optstudy.errors import ConfigError

TASKS = ("classification", "language_model", "objective")


@dataclasses.dataclass(frozen=True)
class Data:
    train: Dataset
    val: Dataset
    task: str  # one of TASKS
    shape: tuple[int, ...] = ()  # one input example's shape (classification), () otherwise
    n_classes: int = 0  # classes, or vocabulary size for language models
    datamodule: object = None  # a LightningDataModule whose loaders train and validate (train/val: their datasets)


def _registry() -> dict[str, Callable[..., Data]]:
    from optstudy.data import _embedded, _files, _sparse, _synthetic

    return {**_embedded.DATASETS, **_files.DATASETS, **_synthetic.DATASETS, **_sparse.DATASETS}


def names() -> tuple[str, ...]:
    return tuple(_registry())


def label(cfg) -> str:
    """What names the data in tags and lines: ``name``, else the ``_target_`` (data of the user's own)."""
    return cfg.get("name") or cfg.get("_target_")


def load(cfg, seed: int) -> Data:
    """The dataset ``cfg.name`` built from the other keys of ``cfg`` (minus ``batch_size``) and the run's seed, or
    the one ``cfg._target_`` returns; ``data.task``, ``data.n_classes``, ``data.shape`` are then recorded in ``cfg``
    where it has them or a target (``_target.record``)."""
    from optstudy.data import _target

    if _target.has_target(cfg):
        loaded = _target.load(cfg, seed)
    else:
        registry = _registry()
        if cfg.name not in registry:
            raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; valid names: {', '.join(registry)}")
        params = {k: v for k, v in cfg.items() if k not in _target.OURS}
        loaded = registry[cfg.name](seed=seed, **params)
    _target.record(cfg, loaded)
    return loaded
