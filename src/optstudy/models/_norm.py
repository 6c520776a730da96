"""Options the ``mlp`` and ``cnn`` share: batch normalization (``model.batch_norm``) and the initialisation
(``model.init``, ``model.init_std``), checked where the model reads them."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from optstudy.errors import ConfigError

# default: PyTorch's own (Kaiming-uniform weights, the model exactly as without the option); normal: weights
# N(0, init_std²) and biases 0; zero: weights and biases 0 (nothing breaks the symmetry but noise)
INITS = ("default", "normal", "zero")


def check_options(batch_norm, init, init_std) -> None:
    if not isinstance(batch_norm, bool):
        raise ConfigError(f"model.batch_norm must be true or false, got {batch_norm!r}")
    if init not in INITS:
        raise ConfigError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
    if not (isinstance(init_std, numbers.Real) and not isinstance(init_std, bool) and init_std > 0):
        raise ConfigError(f"model.init_std must be a number > 0, got {init_std!r}")


@torch.no_grad()
def initialise(model: nn.Module, init: str, std: float) -> nn.Module:
    """Re-initialises ``model``'s Linear and Conv layers (BatchNorm keeps its 1 and 0) unless ``init`` is default,
    which draws nothing more: the model and the global RNG are as without the option."""
    if init == "default":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if init == "normal":
                m.weight.normal_(0.0, std)
            else:
                m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    return model
