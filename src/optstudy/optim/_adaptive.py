"""Adagrad, Adadelta and RMSprop: per-element step sizes from accumulated squared gradients, no first moment."""

from __future__ import annotations

import torch

from optstudy.optim._base import CoreOptimizer
from optstudy.optim._pieces import coupled_decay, ema_, ema_sq_, num


def _sparse_like(g: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A sparse tensor with ``g``'s (coalesced) indices and ``values``."""
    return torch.sparse_coo_tensor(g._indices(), values, g.shape)


def _adagrad_kernel(p, g, s, *, clr, eps, wd, decay):
    g = coupled_decay(p, g, wd, decay)
    s.add_(g * g)
    p.sub_(g / (s.sqrt() + eps) * clr)


class Adagrad(CoreOptimizer):
    r"""Adagrad (Duchi et al., 2011)::

        s_0 = initial_accumulator_value;  s ← s + g²;  η_t = η / (1 + (t-1)·lr_decay);  θ ← θ - η_t·g / (√s + ε)

    Equal to ``torch.optim.Adagrad``; defaults lr=1e-2, lr_decay=0, initial_accumulator_value=0, eps=1e-10. Sparse
    gradients update only the rows they touch, as torch does (without coupled weight decay).
    Effective learning rate ``η_t / (√s + ε)``; direction ``g``.
    """

    name = "adagrad"
    DEFAULTS = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                    decoupled_weight_decay=False, maximize=False)
    kernel = staticmethod(_adagrad_kernel)
    TORCH_FLAGS = dict(foreach=None, differentiable=False, fused=None)
    SPARSE = True

    def buffers(self, group):
        return ("sum",)

    def init_state(self, p, state, group):
        super().init_state(p, state, group)
        state["sum"].fill_(group["initial_accumulator_value"])

    def scalars(self, group, state):
        clr = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
        return dict(clr=clr, eps=num(group["eps"]))

    def sparse_step(self, p, g, state, group, s):
        if s["decay"] is not None:
            p.mul_(s["decay"])
        g = g.coalesce()
        values = g._values()
        state["sum"].add_(_sparse_like(g, values * values))
        std = state["sum"].sparse_mask(g)._values().sqrt_().add_(s["eps"])
        p.add_(_sparse_like(g, values / std), alpha=-s["clr"])

    def effective_lr(self, p, state, group, s):
        return s["clr"] / state["sum"].sqrt().add_(s["eps"])


def _adadelta_kernel(p, g, a, u, u_next, *, lr, rho, gain, eps, wd, decay):
    g = coupled_decay(p, g, wd, decay)
    ema_sq_(a, g, rho, gain)
    delta = (u + eps).sqrt() / (a + eps).sqrt() * g
    u_next.copy_(u * rho + delta * delta * gain)
    p.sub_(delta * lr)


class Adadelta(CoreOptimizer):
    r"""Adadelta (Zeiler, 2012)::

        a ← ρ·a + (1-ρ)·g²;  Δ = √(u + ε) / √(a + ε) · g;  u ← ρ·u + (1-ρ)·Δ²;  θ ← θ - η·Δ

    Equal to ``torch.optim.Adadelta``: lr scales the step after ``u`` stored the unscaled Δ. Defaults lr=1.0, rho=0.9,
    eps=1e-6. Effective learning rate ``η·√(u_prev + ε)/√(a + ε)`` with the ``u`` of before the step; direction ``g``.
    ``u`` is double-buffered (the new value goes to a second tensor, then the two swap) so that the previous one is
    still there for ``effective_lrs()`` without a copy.
    """

    name = "adadelta"
    DEFAULTS = dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    kernel = staticmethod(_adadelta_kernel)
    TORCH_FLAGS = dict(foreach=None, differentiable=False, capturable=False)

    def buffers(self, group):
        return ("square_avg", "acc_delta", "acc_delta_prev")

    def scalars(self, group, state):
        rho = num(group["rho"])
        return dict(lr=group["lr"], rho=rho, gain=1 - rho, eps=num(group["eps"]))

    def after_kernel(self, state, group, s):
        # the kernel read u from acc_delta and wrote the new u into acc_delta_prev: swap so that "acc_delta" is the
        # current u again and "acc_delta_prev" holds the one the last step used
        u, u_next = state["acc_delta"], state["acc_delta_prev"]
        if torch.compiler.is_compiling():  # a swap would give the graph other input tensors each step: copy
            u, u_next = (t.view(1) if t.dim() == 0 else t for t in (u, u_next))  # 0-d: see CoreOptimizer._row
            u_prev = u.clone()
            u.copy_(u_next)
            u_next.copy_(u_prev)
        else:
            state["acc_delta_prev"], state["acc_delta"] = u, u_next

    def effective_lr(self, p, state, group, s):
        a, u_prev = state["square_avg"], state["acc_delta_prev"]
        return u_prev.add(s["eps"]).sqrt_().div_(a.add(s["eps"]).sqrt_()).mul_(s["lr"])


def _rmsprop_kernel(p, g, a, *rest, lr, alpha, gain, eps, momentum, centered, wd, decay):
    g = coupled_decay(p, g, wd, decay)
    ema_sq_(a, g, alpha, gain)
    rest = list(rest)
    if centered:
        g_avg = rest.pop(0)
        ema_(g_avg, g, alpha, gain)
        d = (a - g_avg * g_avg).sqrt() + eps
    else:
        d = a.sqrt() + eps
    if rest:
        (b,) = rest
        b.mul_(momentum).add_(g / d)
        p.sub_(b * lr)
    else:
        p.sub_(g / d * lr)


class RMSprop(CoreOptimizer):
    r"""RMSprop (Hinton's lecture 6e), optionally centered (Graves, 2013) and with momentum::

        a ← α·a + (1-α)·g²;  centered: ḡ ← α·ḡ + (1-α)·g, a' = a - ḡ²;  d = √a' + ε
        momentum μ > 0: b ← μ·b + g/d, θ ← θ - η·b;  else θ ← θ - η·g/d

    Equal to ``torch.optim.RMSprop``; defaults lr=1e-2, alpha=0.99, eps=1e-8, momentum=0, centered=False. No bias
    correction, so the first steps are about 10η long. Effective learning rate ``η/d`` with direction ``g``; with
    momentum ``η`` with direction ``b`` (``b`` already carries the 1/d scaling).
    """

    name = "rmsprop"
    DEFAULTS = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                    decoupled_weight_decay=False, maximize=False)
    kernel = staticmethod(_rmsprop_kernel)
    TORCH_FLAGS = dict(foreach=None, differentiable=False, capturable=False)

    def buffers(self, group):
        return ("square_avg",) + (("grad_avg",) if group["centered"] else ()) + (
            ("momentum_buffer",) if group["momentum"] > 0 else ())

    def scalars(self, group, state):
        alpha = num(group["alpha"])
        return dict(lr=group["lr"], alpha=alpha, gain=1 - alpha, eps=num(group["eps"]),
                    momentum=num(group["momentum"]), centered=bool(group["centered"]))

    def effective_lr(self, p, state, group, s):
        if "momentum_buffer" in state:
            return torch.ones_like(p) * s["lr"]  # lr: a number, or per member
        a = state["square_avg"]
        if "grad_avg" in state:
            a = a.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
        return s["lr"] / a.sqrt().add_(s["eps"])
