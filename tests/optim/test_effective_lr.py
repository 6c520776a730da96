"""Effective learning rates: ``θ_new - θ_old = -lr_eff ⊙ direction`` for every optimizer, and the histogram helper."""

from __future__ import annotations

import math

import pytest
import torch

import optstudy.optim as o
from tests.optim.cases import CASES, case_params, make_params, set_grads


@pytest.mark.parametrize("name,hp", case_params())
def test_effective_lr_times_direction_is_the_step(name, hp):
    params = make_params()
    opt = o.build(name, params, impl="loop", **hp)
    for k in range(12):
        set_grads(params, k)
        before = [p.detach().clone() for p in params]
        grads = [p.grad + opt.param_groups[0]["weight_decay"] * b for p, b in zip(params, before)]
        opt.step()
        lrs = opt.effective_lrs()
        assert len(lrs) == len(params)
        for p, b, g, lr in zip(params, before, grads, lrs):
            assert lr.shape == p.shape
            direction = CASES[name].direction(opt.state[p], g, opt.param_groups[0])
            torch.testing.assert_close(p.detach() - b, -lr * direction, rtol=1e-9, atol=1e-12)


def test_effective_lr_of_sgd_is_lr_everywhere():
    params = make_params()
    opt = o.build("momentum", params, lr=0.03)
    set_grads(params, 0)
    opt.step()
    assert all(torch.all(lr == 0.03) for lr in opt.effective_lrs())


def test_effective_lrs_are_empty_before_a_step_and_after_loading_state():
    params = make_params()
    opt = o.build("adam", params)
    assert opt.effective_lrs() == []
    set_grads(params, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.effective_lrs() == []


def _adabound_after(steps=20, **hp):
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:], "final_lr": 0.01}]
    opt = o.build("adabound", groups, impl="loop", lr=0.01, **hp)
    for k in range(steps):
        set_grads(params, k)
        opt.step()
    return opt, params


def test_histogram_counts_every_element_per_group():
    opt, params = _adabound_after(gamma=0.05)
    h = o.lr_histogram(opt, bins=64, low=-8, high=4)
    assert h.counts.shape == (2, 64)
    assert h.counts[0].sum() == params[0].numel() + params[1].numel()
    assert h.counts[1].sum() == params[2].numel() + params[3].numel()
    assert torch.equal(h.total, h.counts.sum(0))
    flat = [torch.cat([lr.flatten() for lr in opt.effective_lrs()[:2]]).log10()]
    assert h.min[0] == pytest.approx(flat[0].min().item())
    assert h.max[0] == pytest.approx(flat[0].max().item())


def test_histogram_quantiles_are_within_a_bin_of_the_exact_ones():
    opt, _ = _adabound_after(gamma=0.01)
    h = o.lr_histogram(opt, bins=240, low=-8, high=4)
    width = 12 / 240
    exact = torch.cat([lr.flatten() for lr in opt.effective_lrs()]).log10()
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    approx = h.quantiles(qs)
    for q, a in zip(qs, approx):
        assert abs(a.item() - torch.quantile(exact, q).item()) <= width + 1e-9, q


def test_clipped_fractions_match_a_direct_count():
    opt, _ = _adabound_after(gamma=0.05)
    h = o.lr_histogram(opt)
    for gi, group in enumerate(opt.param_groups):
        n_lo = n_hi = n = 0
        for p in group["params"]:
            st = opt.state[p]
            lo, hi = opt.bounds(group, st["step"])
            bc1, bc2 = 1 - 0.9 ** st["step"], 1 - 0.999 ** st["step"]
            raw = group["lr"] * math.sqrt(bc2) / bc1 / (st["exp_avg_sq"].sqrt() + group["eps"])
            n_lo += int((raw < lo).sum())
            n_hi += int((raw > hi).sum())
            n += p.numel()
        assert h.clipped_lower[gi].item() == pytest.approx(n_lo / n)
        assert h.clipped_upper[gi].item() == pytest.approx(n_hi / n)
    assert h.clipped_lower.sum() + h.clipped_upper.sum() > 0  # the case exercises the clip


def test_unbounded_optimizers_have_no_clipped_fractions():
    params = make_params()
    opt = o.build("adam", params)
    set_grads(params, 0)
    opt.step()
    h = o.lr_histogram(opt)
    assert h.clipped_lower is None and h.counts.sum() == sum(p.numel() for p in params)


def test_effective_lrs_converge_to_final_lr_under_adabound_but_spread_under_adam():
    """AdaBound's Figure 1 in miniature: after many steps AdaBound's learning rates sit at final_lr, Adam's spread
    over decades."""
    spread = {}
    for name in ("adam", "adabound"):
        params = make_params()
        opt = o.build(name, params, lr=1e-3, **({"final_lr": 0.1, "gamma": 0.05} if name == "adabound" else {}))
        for k in range(400):
            set_grads(params, k)
            for p in params[:3]:  # some elements see much smaller gradients
                p.grad[..., ::2] *= 1e-3
            opt.step()
        h = o.lr_histogram(opt, bins=160)
        lo, hi = h.quantiles([0.05, 0.95])
        spread[name] = (hi - lo).item()
        if name == "adabound":
            bound_lo, bound_hi = opt.bounds(opt.param_groups[0], 400)
            assert math.log10(bound_lo) - 0.05 <= h.min[0] and h.max[0] <= math.log10(bound_hi) + 0.05
    assert spread["adam"] > 1.5 and spread["adabound"] < 0.2, spread
