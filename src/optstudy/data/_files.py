"""Datasets read from their original files under ``data.root``: MNIST, Fashion-MNIST, CIFAR-10 and PTB.

optstudy never downloads. When a file is missing or malformed, the ConfigError names ``data.root``, the path, the files
the dataset expects and where they are published. ``seed`` is accepted for the registry's contract but unused: these
datasets come with a fixed train/test split, used here as train/val.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from optstudy.data import Data
from optstudy.data._embedded import positive_int
from optstudy.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------- locating

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR10_SUBDIR = "cifar-10-batches-py"  # what cifar-10-python.tar.gz extracts to
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt")  # ptb.test.txt is never read: Data has no test split

SOURCES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz, extracted)",
    "ptb": "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz (its data/ folder)",
}
EXPECTS = {
    "mnist": f"{', '.join(IDX_FILES)} (raw or .gz)",
    "fashion_mnist": f"{', '.join(IDX_FILES)} (raw or .gz)",
    "cifar10": f"{', '.join(CIFAR10_FILES)} (in data.root or data.root/{CIFAR10_SUBDIR})",
    "ptb": ", ".join(PTB_FILES),
}


def _not_there(name: str, problem: str) -> ConfigError:
    """The one message for every missing directory or file: what, what was expected, from where, what to do."""
    return ConfigError(
        f"data.root: {problem}; {name} expects {EXPECTS[name]} from {SOURCES[name]}; "
        "optstudy never downloads: put them there or set data.root"
    )


def _directory(name: str, root) -> Path:
    """``root`` as an absolute directory path, or a ConfigError saying what ``name`` expects there."""
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ConfigError(f"data.root must be a directory path, got {root!r}")
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise _not_there(name, f"{path} is not a directory")
    return path


def _locate(name: str, directory: Path, files: tuple[str, ...], gz: bool = False) -> dict[str, Path]:
    """Each of ``files`` in ``directory`` (raw first, then ``.gz`` when ``gz``), or a ConfigError naming the first
    one missing."""
    found = {}
    for file in files:
        candidates = [directory / file, directory / f"{file}.gz"] if gz else [directory / file]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise _not_there(name, f"{directory} has no {file}{'(.gz)' if gz else ''}")
        found[file] = path
    return found


def _malformed(path: Path, what: str, rule: str) -> ConfigError:
    return ConfigError(f"data.root: {path} is not {what}: {rule}")


# ----------------------------------------------------------------------------------------------------------- images


class Images(Dataset):
    """``(x, y)`` items from uint8 images ``(N, C, H, W)``: ``x = (image / 255 - mean) / std`` per channel, float32.

    Images stay uint8 and are converted per item: CIFAR-10's training set takes 150 MB instead of 600 MB as float32.
    ``augment`` is the standard CIFAR augmentation (He et al. 2016), equal to torchvision's
    ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()`` before ``ToTensor``/``Normalize``: zero-pad 4 pixels,
    crop a random window of the original size, flip left-right with probability 1/2. It draws from torch's global RNG,
    which DataLoader seeds differently in each worker (a generator held here would be copied, and repeat, per worker).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean=(0.0,), std=(1.0,), augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.augment:
            image = crop_flip(image, pad=4)
        return (image.float() / 255 - self.mean) / self.std, self.labels[i]


def crop_flip(image: torch.Tensor, pad: int) -> torch.Tensor:
    """One ``(C, H, W)`` image zero-padded by ``pad``, cropped back to ``(H, W)`` at a random offset, maybe flipped."""
    _, h, w = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))  # zeros = black, padded before normalising as torchvision does
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    image = padded[:, top : top + h, left : left + w]
    return image.flip(-1) if torch.rand(()) < 0.5 else image


def _first(limit: int | None, *tensors: torch.Tensor):
    return tensors if limit is None else tuple(t[:limit] for t in tensors)


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated stream is an EOFError
        raise _malformed(path, "a readable (gzipped) file", str(e)) from e


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """The uint8 array of an IDX file (LeCun's MNIST format), checking the header.

    Layout: magic ``0x00 0x00 0x08 ndim`` (0x08: unsigned bytes), then ``ndim`` big-endian uint32 sizes, then the
    ``prod(sizes)`` bytes in row-major order.
    """
    raw = _read_bytes(path)
    what, header = f"an IDX file of {ndim}-d unsigned bytes", 4 + 4 * ndim
    if len(raw) < header:
        raise _malformed(path, what, f"{len(raw)} bytes, shorter than the {header}-byte header")
    magic, expected = int.from_bytes(raw[:4], "big"), 0x0800 + ndim
    if magic != expected:
        raise _malformed(path, what, f"magic number {magic:#010x}, expected {expected:#010x}")
    sizes = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if len(raw) - header != math.prod(sizes):
        rule = f"header sizes {sizes} need {math.prod(sizes)} bytes of data, found {len(raw) - header}"
        raise _malformed(path, what, rule)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(sizes).copy())


def _idx_split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 28, 28) uint8, labels (N,) long)`` of ``split`` ("train" or "t10k")."""
    image_path, label_path = files[f"{split}-images-idx3-ubyte"], files[f"{split}-labels-idx1-ubyte"]
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1).long()
    if images.shape[1:] != (28, 28):
        raise _malformed(image_path, "a file of 28x28 images", f"images are {tuple(images.shape[1:])}")
    if len(labels) != len(images):
        rule = f"{len(labels)} labels for {len(images)} images"
        raise _malformed(label_path, f"the labels of {image_path.name}", rule)
    if len(labels) and labels.max() > 9:
        raise _malformed(label_path, "a file of labels 0..9", f"found label {labels.max().item()}")
    return images.unsqueeze(1), labels


def _idx_dataset(name: str, root, limit: int | None) -> Data:
    """MNIST and Fashion-MNIST: the same four IDX files, 28x28 grey images, 10 classes."""
    positive_int("limit", limit, allow_none=True)
    files = _locate(name, _directory(name, root), IDX_FILES, gz=True)
    train = Images(*_first(limit, *_idx_split(files, "train")))
    val = Images(*_first(limit, *_idx_split(files, "t10k")))
    return Data(train, val, "classification", (1, 28, 28), 10)


def mnist(seed: int, root, limit: int | None = None) -> Data:
    """MNIST (LeCun et al. 1998) from its IDX files in ``root``: 60000 train, 10000 val (the t10k files).

    x is float32 (1, 28, 28) scaled to [0, 1], not standardised (the digits dataset is not either); ``limit`` keeps
    the first ``limit`` examples of each split, for smoke runs.
    """
    return _idx_dataset("mnist", root, limit)


def fashion_mnist(seed: int, root, limit: int | None = None) -> Data:
    """Fashion-MNIST (Xiao et al. 2017): MNIST's file format and sizes with Zalando clothing images; as ``mnist``."""
    return _idx_dataset("fashion_mnist", root, limit)


# ---------------------------------------------------------------------------------------------------------- CIFAR-10

# the mean and std of the AdaBound demo (demos/cifar10/main.py) and most CIFAR code, kept for comparability with its
# results; the std of the training pixels is really about (0.247, 0.243, 0.261)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class _NumpyOnly(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batches hold: dicts, lists, bytes, ints and NumPy arrays.

    Loading a pickle can call any importable function; refusing every other global makes a planted or corrupted file
    fail instead of running code. The batches are Python 2 pickles naming ``numpy.core``; NumPy 2 writes
    ``numpy._core``.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 pickles of bytes at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are expected)")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) long)`` from one pickled batch.

    A batch is a dict with ``b"data"``, an (N, 3072) uint8 array whose rows are the red, green and blue 32x32 planes
    one after the other in row-major order, and ``b"labels"``, N ints in 0..9.
    """
    what = "a CIFAR-10 python batch"
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnly(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 -- whatever unpickling raises, the file is not a batch
        raise _malformed(path, what, f"{type(e).__name__}: {e}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _malformed(path, what, 'expected b"data" as an (N, 3072) uint8 array')
    valid = isinstance(labels, list) and len(labels) == len(data)
    if not (valid and all(isinstance(y, int) and 0 <= y <= 9 for y in labels)):
        raise _malformed(path, what, f'expected b"labels" as a list of {len(data)} ints in 0..9')
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.long)


def cifar10(seed: int, root, augment: bool = True, limit: int | None = None) -> Data:
    """CIFAR-10 (Krizhevsky 2009) from its python batches: 50000 train (data_batch_1..5), 10000 val (test_batch).

    x is float32 (3, 32, 32) standardised per channel with ``CIFAR10_MEAN``/``CIFAR10_STD``; ``augment`` crops and flips
    training images at random (``Images``), never validation ones. ``limit`` keeps the first examples of each split.
    """
    if not isinstance(augment, bool):
        raise ConfigError(f"data.augment must be true or false, got {augment!r}")
    positive_int("limit", limit, allow_none=True)
    directory = _directory("cifar10", root)
    if (directory / CIFAR10_SUBDIR).is_dir():
        directory = directory / CIFAR10_SUBDIR
    files = _locate("cifar10", directory, CIFAR10_FILES)
    batches = [read_cifar_batch(files[f"data_batch_{i}"]) for i in range(1, 6)]
    train = _first(limit, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    val = _first(limit, *read_cifar_batch(files["test_batch"]))
    return Data(
        Images(*train, CIFAR10_MEAN, CIFAR10_STD, augment=augment),
        Images(*val, CIFAR10_MEAN, CIFAR10_STD),
        "classification",
        (3, 32, 32),
        10,
    )


# --------------------------------------------------------------------------------------------------------------- PTB

EOS, UNK = "<eos>", "<unk>"


class TokenChunks(TensorDataset):
    """``(x, y)`` items of ``bptt`` token ids each, ``y`` the next token of each ``x``; ``vocab[i]`` is id i's word."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, vocab: tuple[str, ...]):
        super().__init__(x, y)
        self.vocab = vocab


def read_words(path: Path) -> list[str]:
    """The words of a Mikolov-format text file, ``<eos>`` after each line (as PyTorch's word_language_model)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _malformed(path, "a UTF-8 text file", str(e)) from e
    return [word for line in lines for word in (*line.split(), EOS)]


def _chunks(ids: list[int], bptt: int, limit: int | None, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(x, y)`` rows of ``bptt`` ids, y shifted by one; the tail shorter than a row is dropped."""
    n = (len(ids) - 1) // bptt  # y needs one token past each x
    if n < 1:
        raise ConfigError(f"data.bptt: {path} has {len(ids)} tokens, too few for one {bptt}-token chunk and its target")
    n = n if limit is None else min(n, limit)
    stream = torch.tensor(ids[: n * bptt + 1], dtype=torch.long)
    return stream[:-1].view(n, bptt), stream[1:].view(n, bptt)


def ptb(seed: int, root, bptt: int = 35, limit: int | None = None) -> Data:
    """Penn Treebank in Mikolov's preprocessing (10000-word vocabulary, ``<unk>`` already in the text), word level.

    The vocabulary is the training file's words in order of first appearance (``<eos>`` included, ``<unk>`` added if
    absent, so real PTB gives 10000); a validation word outside it becomes ``<unk>``. Items are consecutive
    non-overlapping ``bptt``-token chunks (35 as in Zaremba et al. 2014); ``limit`` keeps the first chunks of each
    split.
    """
    positive_int("bptt", bptt)
    positive_int("limit", limit, allow_none=True)
    files = _locate("ptb", _directory("ptb", root), PTB_FILES)
    train_words = read_words(files["ptb.train.txt"])
    vocab = tuple(dict.fromkeys([*train_words, UNK]))  # dict keeps first-appearance order
    index = {word: i for i, word in enumerate(vocab)}
    unk = index[UNK]
    train = _chunks([index[w] for w in train_words], bptt, limit, files["ptb.train.txt"])
    val_ids = [index.get(w, unk) for w in read_words(files["ptb.valid.txt"])]
    val = _chunks(val_ids, bptt, limit, files["ptb.valid.txt"])
    return Data(TokenChunks(*train, vocab), TokenChunks(*val, vocab), "language_model", (), len(vocab))


DATASETS = {"mnist": mnist, "fashion_mnist": fashion_mnist, "cifar10": cifar10, "ptb": ptb}
