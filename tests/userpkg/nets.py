"""Models of a user's own."""

from __future__ import annotations

import math

import torch
from torch import nn


class Net(nn.Module):
    """A small convolutional classifier for ``shape`` = (channels, height, width) inputs (not a ``Sequential``: a
    population runs it through vmap)."""

    def __init__(self, shape: list[int], n_classes: int, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(shape[0], width, 3, padding=1)
        self.head = nn.Linear(width * math.prod(shape[1:]), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class Flat(nn.Module):
    """A linear classifier of flattened ``in_features`` inputs."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class TinyLM(nn.Module):
    """Token ids ``(batch, bptt)`` -> logits ``(batch, bptt, vocab)``."""

    def __init__(self, vocab: int, emb: int = 8):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, emb), nn.Linear(emb, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


class Bowl(nn.Module):
    """An objective model: the loss is ``|x - 3|^2``, its parameter the iterate ``x``."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim))

    def forward(self, batch=None) -> torch.Tensor:
        return ((self.x - 3) ** 2).sum()

    @torch.no_grad()
    def val_loss(self) -> torch.Tensor:
        return self.forward()

    def metrics(self) -> dict[str, float]:
        return {"x0": self.x[0].item()}

    def project_(self) -> None:
        pass


class Pair(nn.Module):
    """Returns a tuple, as some models do in training mode: not logits."""

    def __init__(self, shape: list[int], n_classes: int):
        super().__init__()
        self.inner = Flat(math.prod(shape), n_classes)

    def forward(self, x):
        logits = self.inner(x)
        return logits, logits


def not_a_module(n_classes: int = 10):
    """Returns a function, not a module."""
    return lambda x: x


NOT_CALLABLE = 42
