"""Pieces the kernels share: each is a few tensor ops, in place where the name ends in ``_``.

They are plain functions so that ``torch.compile`` inlines them into one fused loop per tensor. Step-dependent
floats enter only through tensor arithmetic (``x * f``), never as ``alpha=``/``value=``/``lerp`` weights: dynamo
specialises a compiled kernel on the value of a float passed to those, which would recompile it at every step.
"""

from __future__ import annotations

import torch


def coupled_decay(p, g, wd, decay):
    """Weight decay before an update: coupled L2 returns ``g + λθ``; decoupled (AdamW) scales ``θ`` by ``1 - ηλ``."""
    if wd != 0:
        g = g + p * wd
    if decay != 1:
        p.mul_(decay)
    return g


def ema_(m, g, beta):
    """First-moment trace: ``m ← β·m + (1-β)·g``."""
    m.mul_(beta).add_(g * (1 - beta))


def ema_sq_(v, g, beta):
    """Second-moment trace: ``v ← β·v + (1-β)·g²``."""
    v.mul_(beta).add_(g * g * (1 - beta))


def clip_(x, lo, hi):
    """``x.clamp_(lo, hi)``. Compiled, it is written as ``where`` over tensors: a compiled ``clamp`` specialises on
    float bounds (which move every step, so it would recompile each step), and inductor 2.13 keeps the first call's
    values of float scalars given directly to ``where`` (wrong results); ``zeros + lo`` avoids both."""
    if torch.compiler.is_compiling():
        zero = torch.zeros_like(x)
        return torch.where(x < lo, zero + lo, torch.where(x > hi, zero + hi, x))
    return x.clamp_(lo, hi)


def max_(v_max, v):
    """AMSGrad's running maximum ``v̄ ← max(v̄, v)``; returns ``v̄``."""
    v_max.copy_(torch.maximum(v_max, v))
    return v_max
