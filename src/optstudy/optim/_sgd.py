"""SGD, SGD with momentum and Nesterov momentum (one class; the registry names fix the flags)."""

from __future__ import annotations

import torch

from optstudy.optim._base import CoreOptimizer
from optstudy.optim._pieces import coupled_decay, num
from optstudy.optim._rules import fail


def _sgd_kernel(p, g, *buf, lr, wd, decay, mu_buf, keep, mu, nesterov):
    g = coupled_decay(p, g, wd, decay)
    if buf:  # momentum trace: b = mu_buf·b + keep·g (mu_buf=0, keep=1 on the first step: b_1 = g)
        (b,) = buf
        b.mul_(mu_buf).add_(g * keep)
        g = b * mu + g if nesterov else b  # dense + sparse: torch has no sparse + dense
    p.sub_(g * lr)


class _SGDBase(CoreOptimizer):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum.

    With gradient :math:`g` (plus :math:`λθ` when ``weight_decay=λ``), learning rate :math:`η`, momentum :math:`μ`,
    dampening :math:`τ`::

        sgd:       θ ← θ - η·g
        momentum:  b_1 = g_1;  b ← μ·b + (1-τ)·g;  θ ← θ - η·b
        nesterov:  b as above (τ = 0);             θ ← θ - η·(g + μ·b)

    Equal to ``torch.optim.SGD(lr, momentum, dampening, nesterov, maximize)``; defaults: lr=1e-3 (torch ≥ 2.x), μ=0.9
    for the ``momentum`` and ``nesterov`` names. Sparse gradients are taken as torch takes them (without coupled
    weight decay). Effective learning rate: η everywhere; direction: the momentum buffer
    ``b`` for momentum, ``g + μ·b`` for Nesterov, ``g`` for plain SGD.
    """

    kernel = staticmethod(_sgd_kernel)
    TORCH_FLAGS = dict(foreach=None, differentiable=False, fused=None)
    SPARSE = True

    def prepare_group(self, group):
        super().prepare_group(group)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            rule = "must be 0 with Nesterov momentum" if group["dampening"] != 0 else "must be > 0 with Nesterov"
            key = "dampening" if group["dampening"] != 0 else "momentum"
            raise fail(f"optimizer {self.name}", key, rule, group[key])

    def buffers(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def scalars(self, group, state):
        mu = num(group["momentum"])
        later = state["step"] > 1  # a bool, or a tensor under torch.compile: so no branch on it
        return dict(
            lr=group["lr"],
            mu_buf=mu * later,  # 0 on the first step
            keep=1.0 - num(group["dampening"]) * later,  # 1 on the first step
            mu=mu,
            nesterov=bool(group["nesterov"]),
        )

    def sparse_step(self, p, g, state, group, s):
        self.kernel(p, g, *(state[b] for b in self.buffers(group)), **s)

    def effective_lr(self, p, state, group, s):
        return torch.ones_like(p) * s["lr"]  # lr: a number, or per member


class SGD(_SGDBase):
    __doc__ = _SGDBase.__doc__
    name = "sgd"
    DEFAULTS = dict(lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False,
                    maximize=False)
    FIXED = dict(momentum=0.0, dampening=0.0, nesterov=False)


class Momentum(_SGDBase):
    __doc__ = _SGDBase.__doc__
    name = "momentum"
    DEFAULTS = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, decoupled_weight_decay=False,
                    maximize=False)
    FIXED = dict(nesterov=False)


class Nesterov(_SGDBase):
    __doc__ = _SGDBase.__doc__
    name = "nesterov"
    DEFAULTS = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, decoupled_weight_decay=False,
                    maximize=False)
    FIXED = dict(nesterov=True)
