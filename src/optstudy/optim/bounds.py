"""Bound schedules for AdaBound and AMSBound.

A schedule gives the lower and upper bound on the per-element step size as multiples of ``final_lr`` at step ``t``
(``t >= 1``): ``lower(t) -> 1`` from below and ``upper(t) -> 1`` from above, so that the optimizer starts like Adam
(loose bounds) and ends like SGD with lr ``final_lr``. The families differ in how fast they close.

``lower``/``upper`` accept a number, a NumPy array or a tensor, so a schedule can be plotted on its own::

    t = np.arange(1, 10_001)
    plt.loglog(t, Hyperbolic(gamma=1e-3).upper(t))

| name          | lower(t)            | upper(t)              | parameters                       |
|---------------|---------------------|-----------------------|----------------------------------|
| `hyperbolic`  | 1 - 1/(γt + 1)      | 1 + 1/(γt)            | gamma (AdaBound code; default)   |
| `paper`       | hyperbolic, γ = 1-β2 | as hyperbolic        | beta2 (AdaBound paper, Theorem 4)|
| `exponential` | 1 - e^(-rt)         | 1 / (1 - e^(-rt))     | rate                             |
| `linear`      | min(1, t/T)         | max(1, T/t)           | horizon T (steps)                |
| `none`        | 0                   | inf                   | bounds off: Adam with ε inside √ |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from optstudy.errors import ConfigError


def _exp(x):
    if isinstance(x, torch.Tensor):
        return torch.exp(x)
    if isinstance(x, np.ndarray):
        return np.exp(x)
    return math.exp(x)


def _min1(x):  # elementwise min(x, 1) for numbers, arrays and tensors
    if isinstance(x, torch.Tensor):
        return x.clamp(max=1.0)
    return np.minimum(x, 1.0) if isinstance(x, np.ndarray) else min(x, 1.0)


def _max1(x):
    if isinstance(x, torch.Tensor):
        return x.clamp(min=1.0)
    return np.maximum(x, 1.0) if isinstance(x, np.ndarray) else max(x, 1.0)


class BoundSchedule:
    """Base of the schedules: subclasses are frozen dataclasses with positive parameters."""

    name = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"bound {self.name}: {field.name} must be a number > 0, got {value!r}")

    def lower(self, t):
        raise NotImplementedError

    def upper(self, t):
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The schedule as a flat dict (``name`` plus its parameters), e.g. for logging."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Hyperbolic(BoundSchedule):
    """The AdaBound code's schedule: ``final_lr·(1 - 1/(γt+1))`` and ``final_lr·(1 + 1/(γt))``."""

    gamma: float = 1e-3
    name = "hyperbolic"

    def lower(self, t):
        return 1 - 1 / (self.gamma * t + 1)

    def upper(self, t):
        return 1 + 1 / (self.gamma * t)


@dataclasses.dataclass(frozen=True)
class Paper(BoundSchedule):
    """The AdaBound paper's form: the hyperbolic schedule with ``1 - β2`` in place of γ (equal at the defaults)."""

    beta2: float = 0.999
    name = "paper"

    def __post_init__(self):
        if isinstance(self.beta2, bool) or not isinstance(self.beta2, (int, float)) or not 0 <= self.beta2 < 1:
            raise ConfigError(f"bound paper: beta2 must be in [0, 1), got {self.beta2!r}")

    def lower(self, t):
        return Hyperbolic(1 - self.beta2).lower(t)

    def upper(self, t):
        return Hyperbolic(1 - self.beta2).upper(t)


@dataclasses.dataclass(frozen=True)
class Exponential(BoundSchedule):
    """Closes exponentially: ``lower = 1 - e^(-rt)``, ``upper = 1/lower``; faster than hyperbolic once ``rt > 1``."""

    rate: float = 1e-3
    name = "exponential"

    def lower(self, t):
        return 1 - _exp(-self.rate * t)

    def upper(self, t):
        return 1 / (1 - _exp(-self.rate * t))


@dataclasses.dataclass(frozen=True)
class Linear(BoundSchedule):
    """Closes linearly over ``horizon`` steps: ``lower = min(1, t/T)``, ``upper = max(1, T/t)``; SGD after T."""

    horizon: float = 10_000
    name = "linear"

    def lower(self, t):
        return _min1(t / self.horizon)

    def upper(self, t):
        return _max1(self.horizon / t)


@dataclasses.dataclass(frozen=True)
class Unbounded(BoundSchedule):
    """No bounds (lower 0, upper inf): AdaBound becomes Adam with ε added to √v instead of √v̂."""

    name = "none"

    def lower(self, t):
        return 0 * t

    def upper(self, t):
        return 0 * t + math.inf


SCHEDULES: dict[str, type[BoundSchedule]] = {
    cls.name: cls for cls in (Hyperbolic, Paper, Exponential, Linear, Unbounded)
}


def make_bound(spec, **defaults) -> BoundSchedule:
    """A schedule from an instance, a name, or a dict ``{"name": ..., **params}``.

    ``defaults`` fill parameters the spec leaves out and the schedule accepts (the optimizer passes its ``gamma`` and
    ``beta2``), so ``bound="paper"`` takes β2 from the optimizer's betas.
    """
    if isinstance(spec, BoundSchedule):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"bound must be a schedule name, a dict with a 'name' key, or a schedule, got {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    if name not in SCHEDULES:
        raise ConfigError(f"bound: unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(f"bound {name}: unknown parameter {sorted(unknown)[0]!r}; valid parameters: {valid}")
    for key, value in defaults.items():
        if key in fields:
            params.setdefault(key, value)
    return cls(**params)
