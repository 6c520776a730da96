"""Tiny files in each file dataset's original format (MNIST/Fashion-MNIST IDX, CIFAR-10 python batches, PTB text),
written into a directory for tests that read them back (``tests/data/test_loaders.py``) or train on them
(``tests/test_experiments.py``)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

N_TRAIN, N_VAL = 12, 5  # IDX examples written per split


def pixels(n: int, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """Distinct-looking uint8 images: pixel k of the whole array is (k * 7 + offset) mod 256."""
    return ((np.arange(n * np.prod(shape)) * 7 + offset) % 256).astype(np.uint8).reshape(n, *shape)


def write_idx(path: Path, array: np.ndarray, gz: bool, magic: int | None = None):
    """``array`` (uint8) in LeCun's IDX format: magic 0x00000800 + ndim, big-endian uint32 sizes, the bytes."""
    header = (magic if magic is not None else 0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    raw = header + array.tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def idx_dir(root: Path, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    """The four MNIST files in ``root``; returns the train and t10k images written."""
    root.mkdir(exist_ok=True)
    images = {"train": pixels(N_TRAIN, (28, 28), 0), "t10k": pixels(N_VAL, (28, 28), 3)}
    for split, n in (("train", N_TRAIN), ("t10k", N_VAL)):
        write_idx(root / f"{split}-images-idx3-ubyte", images[split], gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz)
    return images["train"], images["t10k"]


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]):
    """One batch as the real files are: a Python 2 era protocol-2 pickle of a dict with bytes keys, whose arrays are
    reconstructed through ``numpy.core.multiarray`` (NumPy 2 would write ``numpy._core``)."""
    batch = {b"batch_label": b"test", b"labels": labels, b"data": images.reshape(len(images), 3072),
             b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def cifar_dir(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Five training batches and a test batch of 4 images each in ``root``; returns all train and val images."""
    root.mkdir(parents=True, exist_ok=True)
    batches = [pixels(4, (3, 32, 32), offset) for offset in range(6)]
    for i, images in enumerate(batches[:5], start=1):
        write_cifar_batch(root / f"data_batch_{i}", images, [(4 * i + k) % 10 for k in range(4)])
    write_cifar_batch(root / "test_batch", batches[5], [9, 8, 7, 6])
    return np.concatenate(batches[:5]), batches[5]


def ptb_dir(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    (root / "ptb.train.txt").write_text(" the cat sat \n the dog <unk> \n")
    (root / "ptb.valid.txt").write_text(" the bird sat \n")  # "bird" is not in the training vocabulary
    (root / "ptb.test.txt").write_text(" a cat \n")
    return root


def data_root(root: Path) -> Path:
    """Every file dataset under ``root`` as the data configs expect them (``<root>/<data.name>``), so that
    ``OPTSTUDY_DATA=<root>`` points all of them there; returns ``root``. The PTB files hold 8 training and 4
    validation tokens: configs need ``data.bptt`` <= 3."""
    root.mkdir(parents=True, exist_ok=True)
    idx_dir(root / "mnist", gz=True)
    idx_dir(root / "fashion_mnist", gz=False)
    cifar_dir(root / "cifar10")
    ptb_dir(root / "ptb")
    return root
