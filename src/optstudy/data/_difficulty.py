"""Difficulty scores for the curriculum orders (``optstudy.data._order``): one number per training example, low = easy.

``data.curriculum.score``:

- ``reference`` (the default, classification): the example's cross-entropy loss under a short reference run, a
  multinomial logistic regression on the flattened inputs (Bengio et al. 2009 used hand-made difficulty, e.g. shape
  variability; scoring by another model's loss or confidence is Hacohen & Weinshall 2019's "transfer" and
  "self-taught" scoring). The run is fixed, so the score depends on the data only: weights and bias start at
  zero, Adam (lr ``REFERENCE["lr"]``) on mini-batches of ``REFERENCE["batch_size"]`` in the order of a generator
  seeded with ``REFERENCE["seed"]``, for ``data.curriculum.reference_epochs`` epochs, at float64.
- ``dataset``: the training set's own ``difficulty`` attribute (a sequence of ``len(train)`` numbers), for data that
  knows how hard each example is (e.g. a synthetic task's noise level or length).

Reference scores are cached on disk, one file per (training set, settings): ``<cache>/<sha256>.pt``, the hash over
the inputs' and labels' bytes, shapes and dtypes and the reference run's settings. ``<cache>`` is
``data.curriculum.cache_dir``, else ``$OPTSTUDY_CACHE/difficulty``, else ``~/.cache/optstudy/difficulty``. The file is
written atomically (a temporary file renamed), so study workers computing the same scores at once do not clash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from optstudy import _cache
from optstudy.errors import ConfigError

# the reference run, fixed: changing any of these changes the cache key, never a cached file's meaning
REFERENCE = {"method": "logreg", "lr": 0.01, "batch_size": 64, "seed": 0, "version": 1}


def cache_dir(configured: str | None = None) -> Path:
    """Where reference scores are kept (module docstring)."""
    return Path(configured).expanduser() if configured else _cache.cache_dir("difficulty")


def scores(data, curriculum: dict, quiet: bool = False) -> torch.Tensor:
    """The training examples' scores, shape (n,), float64, as ``curriculum["score"]`` says."""
    n = len(data.train)
    if curriculum["score"] == "dataset":
        own = getattr(data.train, "difficulty", None)
        if own is None:
            raise ConfigError(f"data.curriculum.score=dataset: the training set ({type(data.train).__name__}) has no "
                              "difficulty attribute; give it one (a number per example) or use score=reference")
        values = torch.as_tensor(np.asarray(own, dtype=np.float64))
        if values.shape != (n,) or not torch.isfinite(values).all():
            raise ConfigError(f"data.curriculum.score=dataset: the training set's difficulty must be {n} finite "
                              f"numbers (one per example), got shape {tuple(values.shape)}")
        return values
    if data.task != "classification":
        raise ConfigError(f"data.curriculum.score=reference: the reference run (a logistic regression) scores "
                          f"classification data only, this is {data.task}; give the training set a difficulty "
                          "attribute and use data.curriculum.score=dataset")
    x, y = _tensors(data.train)
    values, trained, path = cached(x, y, int(curriculum["reference_epochs"]), curriculum.get("cache_dir"))
    if not quiet:
        print(f"difficulty: {'trained the reference run, saved to' if trained else 'read from'} {path}", flush=True)
    return values


def cached(x: torch.Tensor, y: torch.Tensor, epochs: int, directory: str | None = None
           ) -> tuple[torch.Tensor, bool, Path]:
    """``(scores, trained, path)``: the reference scores of (x, y) from the cache, or trained now (``trained``)
    and saved there."""
    settings = {**REFERENCE, "epochs": epochs}
    path = cache_dir(directory) / f"{key(x, y, settings)}.pt"
    values = _read(path)
    if isinstance(values, torch.Tensor) and values.shape == (len(x),):
        return values, False, path
    values = reference_losses(x, y, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(values, tmp)
    os.replace(tmp, path)
    return values, True, path


def _read(path: Path):
    """The cached tensor, or None where there is none or it cannot be read (truncated, foreign: trained again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (whatever a damaged file raises)
        return None


def key(x: torch.Tensor, y: torch.Tensor, settings: dict) -> str:
    """sha256 of the data (bytes, shapes, dtypes) and the reference run's settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def reference_losses(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.Tensor:
    """Each example's cross-entropy after ``epochs`` epochs of the fixed logistic-regression run (module docstring).
    x: (n, ...) inputs, flattened to (n, d); y: (n,) class indices. Returns (n,) float64."""
    inputs = x.reshape(len(x), -1).double()  # (n, d)
    classes = int(y.max()) + 1
    weight = torch.zeros(inputs.shape[1], classes, dtype=torch.float64, requires_grad=True)  # (d, C)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=REFERENCE["lr"])
    gen = torch.Generator().manual_seed(REFERENCE["seed"])
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(REFERENCE["batch_size"]):
            opt.zero_grad()
            F.cross_entropy(inputs[batch] @ weight + bias, y[batch]).backward()
            opt.step()
    with torch.no_grad():
        return F.cross_entropy(inputs @ weight + bias, y, reduction="none")  # (n,)


def labels(data, key: str) -> torch.Tensor:
    """The training set's class labels, (n,) long; a ``ConfigError`` naming ``key`` if it is not classification."""
    if data.task != "classification":
        raise ConfigError(f"{key}: needs class labels (classification data), this is {data.task}")
    return _tensors(data.train)[1].long()


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0], dataset.tensors[1]
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor(np.array([int(y) for _, y in items]))
