"""Adam's ``bias_correction`` switch (the Adam paper's Sec. 6.4 ablation): ``False`` equals a hand-written Adam loop
without the 1-β^t factors at float64; ``True`` (the default) is still torch's Adam."""

from __future__ import annotations

import math

import pytest
import torch

import optstudy.optim as o
from optstudy.errors import ConfigError
from tests.optim.cases import CASES, assert_same, make_params, set_grads, trajectory

STEPS = 30


class Reference:
    """Adam written out element by element from Kingma & Ba's Algorithm 1, with the two bias corrections optional;
    ``amsgrad`` keeps the running max of the raw v (as torch). Plain lists of Python floats: nothing shared with
    the kernel under test."""

    def __init__(self, params, lr, betas, eps=1e-8, weight_decay=0.0, bias_correction=True, amsgrad=False):
        self.params, self.lr, (self.b1, self.b2), self.eps = params, lr, betas, eps
        self.wd, self.bias_correction, self.amsgrad = weight_decay, bias_correction, amsgrad
        self.m = [[0.0] * p.numel() for p in params]
        self.v = [[0.0] * p.numel() for p in params]
        self.v_max = [[0.0] * p.numel() for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        bc1 = 1 - self.b1**self.t if self.bias_correction else 1.0
        bc2 = 1 - self.b2**self.t if self.bias_correction else 1.0
        for p, m, v, v_max in zip(self.params, self.m, self.v, self.v_max):
            flat, grad = p.view(-1), p.grad.reshape(-1).tolist()
            for i, g in enumerate(grad):
                g = g + self.wd * flat[i].item()
                m[i] = self.b1 * m[i] + (1 - self.b1) * g
                v[i] = self.b2 * v[i] + (1 - self.b2) * g * g
                v_max[i] = max(v_max[i], v[i])
                second = v_max[i] if self.amsgrad else v[i]
                flat[i] -= self.lr * (m[i] / bc1) / (math.sqrt(second / bc2) + self.eps)


HPARAMS = [dict(lr=0.01, betas=(0.9, 0.999)), dict(lr=0.003, betas=(0.0, 0.9999)),
           dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)]


@pytest.mark.parametrize("name", ["adam", "amsgrad"])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("hp", HPARAMS, ids=["default-betas", "beta1-0-beta2-0.9999", "wd"])
def test_equals_the_hand_written_loop(name, bias_correction, hp):
    ours, ref = make_params(), make_params()
    opt = o.build(name, ours, impl="loop", bias_correction=bias_correction, **hp)
    reference = Reference(ref, bias_correction=bias_correction, amsgrad=name == "amsgrad", **hp)
    assert_same(trajectory(opt, ours, STEPS), trajectory(reference, ref, STEPS), rtol=1e-10)


@pytest.mark.parametrize("name", ["adam", "amsgrad"])
def test_true_is_the_default_and_still_torch(name):
    assert o.defaults(name)["bias_correction"] is True
    hp = CASES[name].hparams[1]
    ours, ref = make_params(), make_params()
    assert_same(trajectory(o.build(name, ours, impl="loop", bias_correction=True, **hp), ours, STEPS),
                trajectory(CASES[name].reference(ref, **hp), ref, STEPS))


def test_without_correction_the_first_step_is_larger_by_the_missing_factors():
    """Step 1 from the same gradient: corrected, |Δθ| = η (up to ε); uncorrected, η·(1-β1)/√(1-β2)."""
    lr, betas = 1e-3, (0.9, 0.9999)
    moved = {}
    for flag in (True, False):
        params = make_params()
        start = [p.detach().clone() for p in params]
        opt = o.build("adam", params, impl="loop", lr=lr, betas=betas, eps=0.0, bias_correction=flag)
        set_grads(params, 0)
        opt.step()
        moved[flag] = torch.cat([(p.detach() - s).abs().flatten() for p, s in zip(params, start)])
    torch.testing.assert_close(moved[True], torch.full_like(moved[True], lr), rtol=1e-12, atol=0)
    factor = (1 - betas[0]) / math.sqrt(1 - betas[1])  # 10
    torch.testing.assert_close(moved[False], torch.full_like(moved[False], lr * factor), rtol=1e-12, atol=0)


def test_effective_lr_follows_the_flag():
    params = make_params()
    opt = o.build("adam", params, impl="loop", lr=1e-3, betas=(0.9, 0.999), eps=0.0, bias_correction=False)
    set_grads(params, 0)
    opt.step()
    for p, lr in zip(params, opt.effective_lrs()):
        # θ_new - θ_old = -lr_eff · m, with m = (1-β1)·g and no corrections: lr_eff = η/√v = η/(√(1-β2)·|g|)
        torch.testing.assert_close(lr, 1e-3 / (math.sqrt(1 - 0.999) * p.grad.abs()), rtol=1e-12, atol=0)


def test_per_group_and_in_the_state_dict():
    params = make_params()
    opt = o.build("adam", [{"params": params[:2]}, {"params": params[2:], "bias_correction": False}])
    assert [g["bias_correction"] for g in opt.param_groups] == [True, False]
    assert [g["bias_correction"] for g in opt.state_dict()["param_groups"]] == [True, False]


@pytest.mark.parametrize("value", ["no", 0, None])
def test_a_non_boolean_is_rejected(value):
    with pytest.raises(ConfigError, match=rf"adam: bias_correction must be true or false, got {value!r}"):
        o.build("adam", make_params(), bias_correction=value)


def test_other_optimizers_do_not_take_it():
    with pytest.raises(ConfigError, match=r"unknown keyword 'bias_correction'"):
        o.build("adamax", make_params(), bias_correction=False)
