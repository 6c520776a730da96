"""Pieces the kernels share: each is a few tensor ops, in place where the name ends in ``_``.

They are plain functions so that ``torch.compile`` inlines them into one fused loop per tensor. Eagerly, the step's
numbers are Python floats; compiled, they are 0-d tensors (see ``_compiled.py``), so they enter only through tensor
arithmetic (``x * f``), never as ``alpha=``/``value=`` weights, which take numbers only.

Kernels do no arithmetic between scalars: ``scalars`` computes every number a kernel multiplies by (``gain`` = 1-β).
In a population the numbers reach the kernels as tensors of the parameters' compute dtype (``_members.shaped``), and
``1 - β`` on a float32 β would round otherwise than the Python float of the member's standalone run.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sqrt(x):
    """√x of a number (``math.sqrt``, as the references round it), of a tensor (the step's scalars are 0-d tensors
    when a caller compiles the step with ``torch.compile``) or of a population's per-member array (``np.sqrt``,
    correctly rounded as ``math.sqrt``)."""
    if isinstance(x, torch.Tensor):
        return x.sqrt()
    return np.sqrt(x) if isinstance(x, np.ndarray) else math.sqrt(x)


def num(x):
    """``float(x)`` of a group's value; a population's per-member array as it is (``optstudy.optim._members``)."""
    return x if isinstance(x, np.ndarray) else float(x)


def coupled_decay(p, g, wd, decay):
    """Weight decay before an update: coupled L2 (``wd=λ``) returns ``g + λθ``; decoupled (AdamW, ``decay=1-ηλ``)
    scales ``θ``. ``None`` switches either off."""
    if wd is not None:
        g = g + p * wd
    if decay is not None:
        p.mul_(decay)
    return g


def ema_(m, g, beta, gain):
    """First-moment trace: ``m ← β·m + (1-β)·g``, with ``gain`` = 1-β from the step's scalars."""
    m.mul_(beta).add_(g * gain)


def ema_sq_(v, g, beta, gain):
    """Second-moment trace: ``v ← β·v + (1-β)·g²``, with ``gain`` = 1-β from the step's scalars."""
    v.mul_(beta).add_(g * g * gain)


def clip_(x, lo, hi):
    """``x`` clamped into ``[lo, hi]`` in place (bounds are floats eagerly, 0-d tensors compiled)."""
    return x.clamp_(lo, hi)


def max_(v_max, v):
    """AMSGrad's running maximum ``v̄ ← max(v̄, v)``; returns ``v̄``."""
    v_max.copy_(torch.maximum(v_max, v))
    return v_max
