"""Validation of hyperparameters where they enter: the message names the key, the rule and the value."""

from __future__ import annotations

import math
import numbers

import torch

from optstudy.errors import ConfigError


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _nonneg(x) -> bool:
    return _real(x) and x >= 0


def _lr(x) -> bool:  # a number, or a 1-element real tensor as torch.optim accepts (schedulers then fill it in place)
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_complex() and not x.requires_grad and _nonneg(float(x))
    return _nonneg(x)


def _positive(x) -> bool:
    return _real(x) and x > 0


def _unit_open(x) -> bool:  # [0, 1)
    return _real(x) and 0 <= x < 1


def _unit_closed(x) -> bool:  # [0, 1]
    return _real(x) and 0 <= x <= 1


def _flag(x) -> bool:
    return isinstance(x, bool)


def _impl_flag(x) -> bool:  # torch's implementation switches: None (torch's "choose for me") or a bool
    return x is None or isinstance(x, bool)


# key -> (predicate, rule as written in the message)
RULES = {
    "lr": (_lr, "must be a number >= 0"),  # or a 1-element tensor holding one
    "momentum": (_unit_open, "must be in [0, 1)"),
    "dampening": (_unit_closed, "must be in [0, 1]"),
    "eps": (_nonneg, "must be a number >= 0"),
    "weight_decay": (_nonneg, "must be a number >= 0"),
    "alpha": (_unit_closed, "must be in [0, 1]"),
    "rho": (_unit_closed, "must be in [0, 1]"),
    "lr_decay": (_nonneg, "must be a number >= 0"),
    "initial_accumulator_value": (_nonneg, "must be a number >= 0"),
    "momentum_decay": (_nonneg, "must be a number >= 0"),
    "final_lr": (_nonneg, "must be a number >= 0"),
    "gamma": (_positive, "must be a number > 0 (the upper bound divides by gamma*t)"),
    "centered": (_flag, "must be true or false"),
    "nesterov": (_flag, "must be true or false"),
    "amsgrad": (_flag, "must be true or false"),
    "amsbound": (_flag, "must be true or false"),
    "decoupled_weight_decay": (_flag, "must be true or false"),
    "maximize": (_flag, "must be true or false"),
    "foreach": (_impl_flag, "must be true, false or None"),
    "fused": (_impl_flag, "must be true, false or None"),
    "capturable": (_impl_flag, "must be true, false or None"),
    "differentiable": (_impl_flag, "must be true, false or None"),
}

# torch.optim's implementation switches: optstudy accepts each where torch accepts it for the same algorithm, so that
# code written for torch runs unchanged; False/None change nothing, True names what to use instead (never ignored)
IMPL_FLAGS = {
    "foreach": "optstudy has no foreach kernels: impl='compiled' updates 8 tensors per fused call "
               "(impl='loop' is the readable per-tensor step)",
    "fused": "use impl='compiled', optstudy's fused step (one torch.compile'd pass over 8 tensors)",
    "capturable": "CUDA-graph capture of the step is not supported: use impl='compiled', whose scalars reach the "
                  "device without a sync, or torch.compile around the step",
    "differentiable": "neither impl='loop' nor impl='compiled' differentiates through the step (both run under "
                      "torch.no_grad); "
                      "use torch.optim's differentiable=True for that",
}


def fail(owner: str, key: str, rule: str, value) -> ConfigError:
    return ConfigError(f"{owner}: {key} {rule}, got {value!r}")


def check_betas(owner: str, betas) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise fail(owner, "betas", "must be a pair (beta1, beta2)", betas) from None
    for i, b in enumerate((b1, b2)):
        if not _unit_open(b):
            raise fail(owner, f"betas[{i}]", "must be in [0, 1)", b)
    return (float(b1), float(b2))


def check_group(owner: str, group: dict) -> None:
    """Check every known hyperparameter present in ``group``; normalise betas to a tuple of floats."""
    for key, value in group.items():
        if key == "betas":
            group["betas"] = check_betas(owner, value)
        elif key in RULES:
            ok, rule = RULES[key]
            if not ok(value):
                raise fail(owner, key, rule, value)
            if key in IMPL_FLAGS and value:
                raise fail(owner, key, f"cannot be True ({IMPL_FLAGS[key]})", value)
