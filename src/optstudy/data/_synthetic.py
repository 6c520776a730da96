"""The ``synthetic`` dataset: step indices for objective models, whose model *is* the loss (``optstudy.models``)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from optstudy.data import Data
from optstudy.errors import ConfigError


class Steps(Dataset):
    """``n`` items, the step index within the epoch as a 0-d long tensor (a batch of one is a ``(1,)`` tensor).

    Objective models ignore the value and keep their own step counter, which survives epochs and checkpoints; the
    dataset only sets how many optimizer steps an epoch has.
    """

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.tensor(i, dtype=torch.long)


def synthetic(seed: int, steps_per_epoch: int = 100) -> Data:
    """``steps_per_epoch`` training steps and one validation item; ``seed`` is unused (the noise of stochastic
    objectives comes from torch's global RNG, which the run seeds)."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(f"data.steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    return Data(Steps(steps_per_epoch), Steps(1), "objective")


DATASETS = {"synthetic": synthetic}
