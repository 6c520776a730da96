"""Sparse logistic regression: the logits of a bag of active features, with sparse gradients."""

from __future__ import annotations

import torch
from torch import nn


class SparseLogReg(nn.Module):
    """logits = Σ_{j in x} W[j] + b for x a ``(batch, active)`` long tensor of feature indices (binary features).

    ``sparse=True``: W's gradient is a sparse tensor of the rows the batch touched, so SGD and Adagrad (the core
    optimizers that take sparse gradients, as in torch) update only those rows; ``sparse=False``: a dense gradient
    (any optimizer; every step then writes all of W)."""

    def __init__(self, features: int, classes: int, sparse: bool = True):
        super().__init__()
        self.weight = nn.EmbeddingBag(features, classes, mode="sum", sparse=sparse)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x) + self.bias  # [B, active] -> [B, classes]


def sparse_logreg(data, features: int, sparse: bool = True) -> nn.Module:
    return SparseLogReg(features, data.n_classes, sparse)


MODELS = {"sparse_logreg": ("classification", sparse_logreg)}
