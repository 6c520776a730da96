"""Every optimizer equals its reference step by step at float64 (tolerance: ``cases.RTOL``/``cases.ATOL``)."""

from __future__ import annotations

import io

import pytest
import torch

import optstudy.optim as o
from tests.optim.cases import CASES, assert_same, case_params, loss_at, make_params, set_grads, trajectory

STEPS = 30


def test_registry_covers_every_name():
    assert tuple(CASES) == o.NAMES


@pytest.mark.parametrize("name,hp", case_params())
def test_equals_reference(name, hp):
    ours, ref = make_params(), make_params()
    assert_same(trajectory(o.build(name, ours, impl="loop", **hp), ours, STEPS),
                trajectory(CASES[name].reference(ref, **hp), ref, STEPS))


@pytest.mark.parametrize("name,hp", case_params())
def test_equals_reference_with_lr_scheduler(name, hp):
    """An LR scheduler changes lr mid-run; AdaBound's bounds follow lr / initial lr as in its code."""
    ours, ref = make_params(), make_params()
    opt_a, opt_b = o.build(name, ours, impl="loop", **hp), CASES[name].reference(ref, **hp)
    sched_a = torch.optim.lr_scheduler.MultiStepLR(opt_a, milestones=[5, 12], gamma=0.3)
    sched_b = torch.optim.lr_scheduler.MultiStepLR(opt_b, milestones=[5, 12], gamma=0.3)
    assert_same(trajectory(opt_a, ours, STEPS, scheduler=sched_a), trajectory(opt_b, ref, STEPS, scheduler=sched_b))
    assert opt_a.param_groups[0]["lr"] == pytest.approx(hp["lr"] * 0.09)


@pytest.mark.parametrize("name", o.NAMES)
def test_param_groups_with_different_hyperparameters(name):
    hp = CASES[name].hparams[0]
    ours, ref = make_params(), make_params()

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": hp["lr"] * 3, "weight_decay": 0.1}]

    assert_same(trajectory(o.build(name, groups(ours), impl="loop", **hp), ours, STEPS),
                trajectory(CASES[name].reference(groups(ref), **hp), ref, STEPS))


@pytest.mark.parametrize("name", o.NAMES)
def test_group_added_later_is_updated_like_a_fresh_optimizer(name):
    """``add_param_group`` mid-run: the new group gets its own state and initial lr (the reference AdaBound silently
    skips such groups)."""
    hp = CASES[name].hparams[0]
    ours, fresh = make_params(), make_params()
    opt = o.build(name, ours[:2], impl="loop", **hp)
    trajectory(opt, ours, 5)
    opt.add_param_group({"params": ours[2:], "lr": hp["lr"] * 2})
    for p in fresh[:2]:
        p.requires_grad_(False)
    ref = CASES[name].reference(fresh[2:], **{**hp, "lr": hp["lr"] * 2})
    a = trajectory(opt, ours, 10, start=5)
    b = trajectory(ref, fresh, 10, start=5)
    assert_same([x[2:] for x in a], [x[2:] for x in b])


@pytest.mark.parametrize("name", o.NAMES)
def test_state_dict_round_trip_continues_the_trajectory(name):
    hp = CASES[name].hparams[-1]
    ours, resumed = make_params(), make_params()
    opt = o.build(name, ours, impl="loop", **hp)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    trajectory(opt, ours, 10, scheduler=sched)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in ours]}, buf)
    whole = trajectory(opt, ours, 10, start=10, scheduler=sched)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain data only, as Lightning checkpoints need
    with torch.no_grad():
        for p, q in zip(resumed, saved["params"]):
            p.copy_(q)
    opt2 = o.build(name, resumed, impl="loop", **{**hp, "lr": 123.0})  # the state dict restores lr
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert_same(whole, trajectory(opt2, resumed, 10, start=10, scheduler=sched2), rtol=0, atol=0)


@pytest.mark.parametrize("name", o.NAMES)
def test_closure_is_evaluated_and_its_loss_returned(name):
    hp = CASES[name].hparams[0]
    ours, ref = make_params(), make_params()
    opt = o.build(name, ours, impl="loop", **hp)
    losses = []
    for k in range(5):
        def closure(k=k):
            opt.zero_grad()
            loss = loss_at(ours, k)
            loss.backward()
            return loss

        losses.append(opt.step(closure))
    assert all(isinstance(x, torch.Tensor) for x in losses)
    assert_same([[p.detach() for p in ours]], [trajectory(CASES[name].reference(ref, **hp), ref, 5)[-1]])


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_decoupled_weight_decay_equals_torch(name):
    ours, ref = make_params(), make_params()
    hp = dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    assert_same(trajectory(o.build(name, ours, impl="loop", **hp), ours, STEPS),
                trajectory(CASES[name].reference(ref, **hp), ref, STEPS))


@pytest.mark.parametrize("name", o.NAMES)
def test_decoupled_weight_decay_scales_theta_before_the_update(name):
    """With gradients that do not depend on θ, decoupled decay gives θ_t = (1-ηλ)·θ_{t-1} - u_t, where u_t is the
    update of the same optimizer without decay."""
    hp = {**CASES[name].hparams[0]}
    lr, lam = hp["lr"], 0.2
    decayed, plain = make_params(), make_params()
    opt_d = o.build(name, decayed, impl="loop", weight_decay=lam, decoupled_weight_decay=True, **hp)
    opt_p = o.build(name, plain, impl="loop", **hp)
    expected = [p.detach().clone() for p in decayed]
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in plain]
        before = [p.detach().clone() for p in plain]
        for p, q, g in zip(decayed, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_d.step()
        opt_p.step()
        expected = [(1 - lr * lam) * e + (q.detach() - b) for e, q, b in zip(expected, plain, before)]
        for p, e in zip(decayed, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_adabound_without_bounds_equals_adam_with_eps_inside_the_root():
    """``bound="none"``: the clip is off and AdaBound is Adam with ε added to √v; equal to Adam(eps=0) at ε=0."""
    ours, ref = make_params(), make_params()
    assert_same(trajectory(o.build("adabound", ours, impl="loop", lr=0.01, eps=0.0, bound="none"), ours, STEPS),
                trajectory(torch.optim.Adam(ref, lr=0.01, eps=0.0, foreach=False), ref, STEPS))


def test_paper_bound_equals_hyperbolic_with_one_minus_beta2():
    a, b = make_params(), make_params()
    assert_same(trajectory(o.build("adabound", a, impl="loop", lr=0.01, betas=(0.9, 0.99), bound="paper"), a, STEPS),
                trajectory(o.build("adabound", b, impl="loop", lr=0.01, betas=(0.9, 0.99), gamma=0.01), b, STEPS))


@pytest.mark.parametrize("name", o.NAMES)
def test_parameters_without_gradients_are_left_alone(name):
    params = make_params()
    opt = o.build(name, params, impl="loop", **CASES[name].hparams[0])
    set_grads(params, 0)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before)
    assert len(opt.effective_lrs()) == len(params) - 1


def skipping_trajectory(opt, params, steps=STEPS):
    """Param 1 gets no gradient on steps 0-2, param 2 none on step 5: each keeps its own step count (bias
    corrections, NAdam's momentum product, momentum's first step) as in the references."""
    out = []
    for k in range(steps):
        set_grads(params, k)
        if k < 3:
            params[1].grad = None
        if k == 5:
            params[2].grad = None
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("name", o.NAMES)
def test_parameters_that_skip_steps_equal_the_reference(name):
    hp = CASES[name].hparams[0]
    ours, ref = make_params(), make_params()
    assert_same(skipping_trajectory(o.build(name, ours, impl="loop", **hp), ours),
                skipping_trajectory(CASES[name].reference(ref, **hp), ref))
