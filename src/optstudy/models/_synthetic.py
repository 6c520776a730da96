r"""Objective models: synthetic problems whose parameters are the iterate and whose ``forward`` is the loss.

Each is an ``Objective``: ``forward(batch)`` in training mode advances the step counter ``t`` (a buffer, so a
checkpoint resumes it; ``t = 1`` at the first step) and returns this step's loss, drawing any noise from torch's
global RNG so that the run's seed makes it deterministic; in eval mode it returns the noise-free objective and leaves
``t`` alone. ``val_loss()`` is that noise-free objective, ``metrics()`` the floats to log every step, ``project_()``
the projection the loop applies after every optimizer step. The batch (step indices from the ``synthetic`` dataset)
is ignored: the counter, not the index within an epoch, sets the step.

The 2-D surfaces also carry what ``optstudy.plots.trajectory_plot`` draws: ``surface(x, y)`` (vectorised over
tensors or arrays), ``extent = (xmin, xmax, ymin, ymax)`` and ``minimum`` (``(x*, y*)`` or ``None``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from optstudy.errors import ConfigError


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"model.{key} {rule}, got {value!r}")


def _point(key: str, value) -> tuple[float, float]:
    """A config list ``[x, y]`` as two floats."""
    ok = not isinstance(value, (str, bytes)) and len(value) == 2 and all(math.isfinite(float(v)) for v in value)
    _check(ok, key, "must be a pair of finite numbers [x, y]", value)
    return float(value[0]), float(value[1])


class Objective(nn.Module):
    """Base of the objective models (see the module docstring); subclasses define ``objective()`` and, when the
    training loss is noisy or changes with the step, ``loss(t)``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def forward(self, batch=None) -> torch.Tensor:
        if not self.training:
            return self.objective()
        self.t += 1
        return self.loss(self.t)

    def objective(self) -> torch.Tensor:
        """The noise-free objective at the current iterate, differentiable."""
        raise NotImplementedError

    def loss(self, t: torch.Tensor) -> torch.Tensor:
        """The training loss of step ``t`` (a 0-d long tensor, kept on the device so nothing syncs)."""
        return self.objective()

    @torch.no_grad()
    def val_loss(self) -> torch.Tensor:
        return self.objective().detach()

    def metrics(self) -> dict[str, float]:
        return {}

    def project_(self) -> None:
        """No constraint by default."""


class Counterexample(Objective):
    r"""The online convex problem on which Adam fails (Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond",
    ICLR 2018, Sec. 3 and the synthetic experiment of Sec. 5)::

        online:      f_t(x) = s·C·x  if t mod P = 1,  else  -s·x        t = 1, 2, ...
        stochastic:  f_t(x) = s·C·x  with probability p, else -s·x
        x ∈ [-1, 1]  (``project_`` clamps)

    Defaults C = P = 101, p = 0.01, s = 1: a period sums to s·(C - P + 1)·x = s·x and the stochastic loss has mean
    s·(pC - (1-p))·x = 0.02·s·x, so x = -1 is regret-optimal. The paper's Sec. 5 uses 1010x / -10x, i.e. s = 10;
    Adam and AMSGrad are scale-invariant (up to ε), so s matters only to SGD-like steps, e.g. AdaBound's bounds.

    Why Adam fails (β1 = 0.9, β2 = 0.99, lr α/√t): v jumps with the rare gradient C, which caps the step C causes,
    then decays by β2 a step, so the next P - 1 steps of gradient -1 are taken with a growing step size and together
    outweigh it: x climbs to +1, the worst point. AMSGrad divides by max(v), those steps stay small, x goes to -1.

    ``val_loss`` is the expected per-step loss, slope·x; ``metrics`` is ``{"x": x}``. ``x0`` defaults to 0, as in
    labml.ai's reproduction of the paper's figure (the paper does not state its starting point).
    """

    def __init__(self, C: float | None = None, period: int = 101, stochastic: bool = False, p: float = 0.01,
                 scale: float = 1.0, x0: float = 0.0):
        super().__init__()
        _check(isinstance(period, int) and not isinstance(period, bool) and period >= 2, "period",
               "must be an integer >= 2", period)
        C = float(period if C is None else C)
        _check(C > 0, "C", "must be > 0 (null: C = period)", C)
        _check(isinstance(stochastic, bool), "stochastic", "must be true or false", stochastic)
        _check(0 < p < 1, "p", "must be in (0, 1)", p)
        _check(scale > 0, "scale", "must be > 0", scale)
        _check(-1 <= x0 <= 1, "x0", "must be in the feasible set [-1, 1]", x0)
        self.C, self.period, self.stochastic, self.p, self.scale = C, period, stochastic, float(p), float(scale)
        self.x = nn.Parameter(torch.tensor([float(x0)]))

    def slope(self) -> float:
        """The expected per-step slope E f_t'(x): s·(C - (P-1))/P online, s·(pC - (1-p)) stochastic."""
        if self.stochastic:
            return self.scale * (self.p * self.C - (1 - self.p))
        return self.scale * (self.C - (self.period - 1)) / self.period

    def objective(self):
        return self.slope() * self.x.sum()

    def loss(self, t):
        big = torch.rand((), device=t.device) < self.p if self.stochastic else t % self.period == 1
        coefficient = torch.where(big, self.C, -1.0).to(self.x.dtype) * self.scale
        return coefficient * self.x.sum()

    def metrics(self):
        return {"x": self.x.item()}

    @torch.no_grad()
    def project_(self):
        self.x.clamp_(-1.0, 1.0)


class NoisyQuadratic(Objective):
    r"""The noisy quadratic model (NQM) of Zhang et al., "Which Algorithmic Choices Matter at Which Batch Sizes?
    Insights From a Noisy Quadratic Model", NeurIPS 2019, Sec. 3::

        L_t(θ) = ½ Σ_i h_i (θ_i - c_i)²,   c_i ~ N(0, σ_i²) drawn each step,   h_i = 1/i,   σ_i² = noise / h_i

    so the stochastic gradient h_i(θ_i - c_i) has mean Hθ and covariance noise·H: the paper's C = H, gradient noise
    covariance equal to the curvature. E L_t = ½ Σ h_i θ_i² + noise·dim/2; ``val_loss`` is ½ Σ h_i θ_i², that minus
    its constant. θ0 = 1: every direction starts at distance 1; the condition number is ``dim``.
    ``metrics`` is ``{"theta_norm": ‖θ‖}``.
    """

    def __init__(self, dim: int = 100, noise: float = 1.0):
        super().__init__()
        _check(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1, "dim", "must be an integer >= 1",
               dim)
        _check(noise >= 0, "noise", "must be >= 0", noise)
        self.noise = float(noise)
        self.theta = nn.Parameter(torch.ones(dim))

    def h(self) -> torch.Tensor:
        """The curvatures 1/i, i = 1..dim, made in θ's dtype and device each call (cheap; exact in float64)."""
        return 1.0 / torch.arange(1, len(self.theta) + 1, dtype=self.theta.dtype, device=self.theta.device)

    def objective(self):
        return 0.5 * (self.h() * self.theta**2).sum()

    def loss(self, t):
        h = self.h()
        c = torch.randn_like(self.theta) * (self.noise / h).sqrt()
        return 0.5 * (h * (self.theta - c) ** 2).sum()

    def metrics(self):
        return {"theta_norm": self.theta.norm().item()}


class Surface(Objective):
    """A 2-D test function of the iterate ``xy = (x, y)``; ``metrics`` is ``{"x": x, "y": y}``. Subclasses give
    ``surface``, ``extent`` and ``minimum``."""

    extent: tuple[float, float, float, float]
    minimum: tuple[float, float] | None

    def __init__(self, start):
        super().__init__()
        self.xy = nn.Parameter(torch.tensor(_point("start", start)))

    def surface(self, x, y):
        raise NotImplementedError

    def objective(self):
        return self.surface(self.xy[0], self.xy[1])

    def metrics(self):
        x, y = self.xy.tolist()
        return {"x": x, "y": y}


class Beale(Surface):
    r"""Beale's function (Beale 1958), as in Ruder's "An overview of gradient descent optimization algorithms" (2016)
    animations::

        f(x, y) = (1.5 - x + xy)² + (2.25 - x + xy²)² + (2.625 - x + xy³)²,   minimum f(3, 0.5) = 0

    Start (1, 1.5): on the flat plateau, where the steep walls in y and the long valley towards (3, 0.5) separate
    plain gradient steps from adaptive ones.
    """

    extent = (-1.0, 4.5, -1.5, 2.5)
    minimum = (3.0, 0.5)

    def __init__(self, start=(1.0, 1.5)):
        super().__init__(start)

    def surface(self, x, y):
        return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


class Rosenbrock(Surface):
    r"""Rosenbrock's banana function (Rosenbrock 1960)::

        f(x, y) = (a - x)² + b·(y - x²)²,   minimum f(a, a²) = 0;  a = 1, b = 100

    Start (-1.5, 2): on the far arm of the curved valley y ≈ x², so a method must follow the valley's nearly flat,
    bending floor round to (1, 1); plain gradient steps crawl along it, adaptive ones much less so.
    """

    extent = (-2.0, 2.0, -1.0, 3.0)

    def __init__(self, a: float = 1.0, b: float = 100.0, start=(-1.5, 2.0)):
        _check(b > 0, "b", "must be > 0", b)
        super().__init__(start)
        self.a, self.b = float(a), float(b)
        self.minimum = (self.a, self.a**2)

    def surface(self, x, y):
        return (self.a - x) ** 2 + self.b * (y - x**2) ** 2


class Saddle(Surface):
    r"""The saddle ``f(x, y) = x² - y²`` of Ruder's animations: a minimum along x, a maximum along y, unbounded below
    (a very negative loss is escape, not divergence). Start (-1, 0.001): nearly on the ridge y = 0, where the
    gradient along y is 2·10⁻³, so plain SGD lingers near the saddle point while adaptive methods, which rescale
    that small gradient, escape at once.
    """

    extent = (-1.5, 1.5, -1.5, 1.5)
    minimum = None

    def __init__(self, start=(-1.0, 1e-3)):
        super().__init__(start)

    def surface(self, x, y):
        return x**2 - y**2


def _factory(cls) -> Callable[..., nn.Module]:
    def factory(data, **params):
        return cls(**params)

    factory.__doc__ = f"``{cls.__name__}(**params)``; ``data`` (the synthetic step indices) is not needed."
    return factory


MODELS = {
    "counterexample": ("objective", _factory(Counterexample)),
    "noisy_quadratic": ("objective", _factory(NoisyQuadratic)),
    "beale": ("objective", _factory(Beale)),
    "rosenbrock": ("objective", _factory(Rosenbrock)),
    "saddle": ("objective", _factory(Saddle)),
}
