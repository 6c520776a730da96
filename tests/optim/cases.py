"""The registry every generic optimizer test iterates: one entry per name in ``optstudy.optim.NAMES``.

An entry gives the reference implementation to equal, hyperparameter cases that exercise every branch, and the update
direction that the effective learning rate multiplies (see ``shared/optimizer-reference.md``). A new optimizer gets the
whole suite by adding an entry here.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import adabound


def _adabound(params, amsbound=False, **kw):
    kw.pop("bound", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adabound.AdaBound(params, amsbound=amsbound, **kw)


@dataclasses.dataclass
class Case:
    name: str
    reference: Callable  # (params, **hparams) -> the reference optimizer
    hparams: list[dict]  # each runs the reference-equality tests; the first is the "typical" one
    direction: Callable  # (state, g_with_coupled_wd, group) -> the direction effective lr multiplies
    has_betas: bool = False


def _g(state, g, group):
    return g


def _buf(state, g, group):
    return state["momentum_buffer"]


def _nesterov_dir(state, g, group):
    return g + group["momentum"] * state["momentum_buffer"]


def _m(state, g, group):
    return state["exp_avg"]


def _rmsprop_dir(state, g, group):
    return state["momentum_buffer"] if "momentum_buffer" in state else g


def _nadam_dir(state, g, group):
    beta1 = group["betas"][0]
    t, psi = state["step"], group["momentum_decay"]
    mu = beta1 * (1 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
    prod = state["mu_product"]
    return (1 - mu) / (1 - prod) * g + mu_next / (1 - prod * mu_next) * state["exp_avg"]


def _torch(cls, **fixed):
    def make(params, **kw):
        return cls(params, foreach=False, **{**fixed, **kw})

    return make


CASES = {
    c.name: c
    for c in [
        Case("sgd", _torch(torch.optim.SGD), [dict(lr=0.05), dict(lr=0.02, weight_decay=0.1)], _g),
        Case("momentum", _torch(torch.optim.SGD, momentum=0.9),
             [dict(lr=0.02), dict(lr=0.01, momentum=0.5, dampening=0.3, weight_decay=0.05)], _buf),
        Case("nesterov", _torch(torch.optim.SGD, momentum=0.9, nesterov=True),
             [dict(lr=0.02), dict(lr=0.01, momentum=0.7, weight_decay=0.05)], _nesterov_dir),
        Case("adagrad", _torch(torch.optim.Adagrad),
             [dict(lr=0.1), dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-6, weight_decay=0.1)],
             _g),
        Case("adadelta", _torch(torch.optim.Adadelta), [dict(lr=1.0), dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1)],
             _g),
        Case("rmsprop", _torch(torch.optim.RMSprop),
             [dict(lr=0.01), dict(lr=0.005, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.1),
              dict(lr=0.005, centered=True), dict(lr=0.005, momentum=0.9, eps=1e-4)], _rmsprop_dir),
        Case("adam", _torch(torch.optim.Adam), [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)],
             _m, True),
        Case("adamax", _torch(torch.optim.Adamax),
             [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)], _m, True),
        Case("nadam", _torch(torch.optim.NAdam),
             [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), momentum_decay=0.0, weight_decay=0.1),
              dict(lr=0.01, momentum_decay=0.05)], _nadam_dir, True),
        Case("amsgrad", _torch(torch.optim.Adam, amsgrad=True),
             [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)], _m, True),
        Case("adabound", _adabound,
             [dict(lr=0.01, final_lr=0.1), dict(lr=0.02, betas=(0.8, 0.99), final_lr=0.05, gamma=0.1, eps=1e-6,
                                                weight_decay=0.1)], _m, True),
        Case("amsbound", lambda p, **kw: _adabound(p, amsbound=True, **kw),
             [dict(lr=0.01, final_lr=0.1), dict(lr=0.02, betas=(0.8, 0.99), final_lr=0.05, gamma=0.1, eps=1e-6,
                                                weight_decay=0.1)], _m, True),
    ]
}


def case_params(names=None):
    """``(name, hparams)`` pairs for ``pytest.mark.parametrize``, with readable ids."""
    import pytest

    out = []
    for name, case in CASES.items():
        if names and name not in names:
            continue
        for i, hp in enumerate(case.hparams):
            out.append(pytest.param(name, hp, id=f"{name}-{i}"))
    return out


# -- a deterministic problem ---------------------------------------------------------------------------------------
SHAPES = [(5, 3), (7,), (2, 3, 4), ()]


def make_params(seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def loss_at(params, k: int) -> torch.Tensor:
    """A step-dependent non-convex loss: the gradient depends on θ, so trajectories compound any difference."""
    gen = torch.Generator().manual_seed(1000 + k)
    total = 0
    for p in params:
        target = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        total = total + ((p - target) ** 2).sum() + torch.sin(3 * p).sum()
    return total


def set_grads(params, k: int) -> None:
    for p in params:
        p.grad = None
    loss_at(params, k).backward()


def trajectory(opt, params, steps: int, start: int = 0, scheduler=None, each=None) -> list[list[torch.Tensor]]:
    """Runs ``steps`` steps of ``opt``; returns the parameters after each."""
    out = []
    for k in range(start, start + steps):
        set_grads(params, k)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if each is not None:
            each(k)
        out.append([p.detach().clone() for p in params])
    return out


# float64 tolerance for "equal to the reference": the kernels reorder a few products relative to the references
# (e.g. g·g·(1-β) for addcmul), which costs a few ulps per step
RTOL, ATOL = 1e-10, 1e-12


def assert_same(a, b, rtol=RTOL, atol=ATOL):
    for step, (xs, ys) in enumerate(zip(a, b, strict=True)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"step {step + 1}, param {i}: {m}")
