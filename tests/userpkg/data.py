"""Data of a user's own: a (train, val) pair of Datasets, a LightningDataModule, and mistakes."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class Blobs(Dataset):
    """``n`` points of ``classes`` Gaussian blobs as (channels, 4, 4) images, labels in ``targets`` (torchvision's
    convention)."""

    def __init__(self, n: int, classes: int, seed: int, channels: int = 2):
        gen = torch.Generator().manual_seed(seed)
        self.targets = self.y = torch.arange(n) % classes
        centers = torch.randn(classes, channels, 4, 4, generator=gen)
        self.x = centers[self.y] + 0.5 * torch.randn(n, channels, 4, 4, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def blobs(seed: int, size: int = 96, classes: int = 3, channels: int = 2):
    """A (train, val) pair: 3/4 of ``size`` to train, the rest to validate, drawn from ``seed``."""
    return Blobs(size * 3 // 4, classes, seed, channels), Blobs(size // 4, classes, seed + 1, channels)


def tokens(size: int = 64, bptt: int = 6, vocab: int = 11):
    """A (train, val) pair of language-model items: x and x shifted by one; takes no seed."""
    stream = torch.arange(size * (bptt + 1)) % vocab
    chunks = stream.view(size, bptt + 1)
    pairs = TensorDataset(chunks[:, :-1], chunks[:, 1:])
    return pairs, TensorDataset(chunks[:8, :-1], chunks[:8, 1:])


class BlobsModule(pl.LightningDataModule):
    """The blobs as a LightningDataModule with its own batch size."""

    def __init__(self, batch_size: int = 16, size: int = 96):
        super().__init__()
        self.batch_size, self.size = batch_size, size

    def setup(self, stage: str) -> None:
        self.train_set, self.val_set = blobs(0, self.size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TrainOnlyModule(BlobsModule):
    """A DataModule without validation data (Lightning's default val_dataloader raises)."""

    val_dataloader = pl.LightningDataModule.val_dataloader


def strings():
    """Items optstudy cannot read: (str, str)."""
    return [("a", "b")] * 4, [("a", "b")] * 2


def one_set():
    """A single Dataset, not a pair."""
    return TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
