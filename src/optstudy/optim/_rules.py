"""Validation of hyperparameters where they enter: the message names the key, the rule and the value."""

from __future__ import annotations

import math
import numbers

from optstudy.errors import ConfigError


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _nonneg(x) -> bool:
    return _real(x) and x >= 0


def _positive(x) -> bool:
    return _real(x) and x > 0


def _unit_open(x) -> bool:  # [0, 1)
    return _real(x) and 0 <= x < 1


def _unit_closed(x) -> bool:  # [0, 1]
    return _real(x) and 0 <= x <= 1


def _flag(x) -> bool:
    return isinstance(x, bool)


# key -> (predicate, rule as written in the message)
RULES = {
    "lr": (_nonneg, "must be a number >= 0"),
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
