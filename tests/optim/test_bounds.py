"""Bound schedules: evaluated on their own, converging to final_lr, pluggable into AdaBound/AMSBound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import optstudy.optim as o
from optstudy.optim.bounds import SCHEDULES, Exponential, Hyperbolic, Linear, Paper, make_bound
from tests.optim.cases import make_params, trajectory

CLOSING = [Hyperbolic(1e-2), Paper(0.99), Exponential(1e-2), Linear(500)]


@pytest.mark.parametrize("sched", CLOSING, ids=lambda s: s.name)
def test_bounds_bracket_one_and_close_on_it(sched):
    t = np.arange(1, 100_001, dtype=np.float64)
    lo, hi = sched.lower(t), sched.upper(t)
    assert np.all(lo <= 1) and np.all(hi >= 1) and np.all(lo >= 0)
    assert np.all(np.diff(lo) >= -1e-15) and np.all(np.diff(hi) <= 1e-12)  # monotone towards 1
    assert lo[-1] > 0.98 and hi[-1] < 1.02
    assert lo[0] < 0.02 and hi[0] > 50  # loose at the start: Adam-like


@pytest.mark.parametrize("sched", CLOSING, ids=lambda s: s.name)
def test_schedules_evaluate_numbers_arrays_and_tensors_alike(sched):
    ts = [1, 10, 1000]
    arr = sched.lower(np.array(ts, dtype=float))
    ten = sched.upper(torch.tensor(ts, dtype=torch.float64))
    for i, t in enumerate(ts):
        assert arr[i] == pytest.approx(sched.lower(t))
        assert ten[i].item() == pytest.approx(sched.upper(t))


def test_hyperbolic_is_the_adabound_code():
    s = Hyperbolic(gamma=1e-3)
    assert s.lower(1000) == pytest.approx(1 - 1 / 2)
    assert s.upper(1000) == pytest.approx(2)


def test_families_close_at_different_speeds():
    t = 3000
    gaps = {s.name: s.upper(t) - s.lower(t) for s in (Hyperbolic(1e-3), Exponential(1e-3), Linear(10_000))}
    assert len({round(g, 3) for g in gaps.values()}) == 3


def test_make_bound_accepts_names_dicts_and_instances():
    assert make_bound("exponential") == Exponential()
    assert make_bound({"name": "linear", "horizon": 200}) == Linear(200)
    assert make_bound(Paper(0.9)) == Paper(0.9)
    assert make_bound("hyperbolic", gamma=0.5, beta2=0.9) == Hyperbolic(0.5)
    assert make_bound("paper", gamma=0.5, beta2=0.9) == Paper(0.9)
    assert set(SCHEDULES) == {"hyperbolic", "paper", "exponential", "linear", "none"}
    assert Linear(200).params() == {"name": "linear", "horizon": 200}


@pytest.mark.parametrize("spec", ["exponential", {"name": "linear", "horizon": 50}, Paper(0.99), "none"],
                         ids=str)
@pytest.mark.parametrize("name", ["adabound", "amsbound"])
def test_every_step_size_stays_within_the_schedule(name, spec):
    params = make_params()
    opt = o.build(name, params, lr=0.05, final_lr=0.02, bound=spec)
    for k in range(60):
        trajectory(opt, params, 1, start=k)
        lo, hi = opt.bounds(opt.param_groups[0], k + 1)
        for lr in opt.effective_lrs():
            assert torch.all(lr >= lo * (1 - 1e-12)) and torch.all(lr <= hi * (1 + 1e-12))


def test_gamma_configures_the_default_schedule():
    opt = o.build("adabound", make_params(), gamma=0.2)
    assert opt.param_groups[0]["bound"] == {"name": "hyperbolic", "gamma": 0.2}
    lo, hi = opt.bounds(opt.param_groups[0], 10)
    assert lo == pytest.approx(0.1 * (1 - 1 / 3)) and hi == pytest.approx(0.1 * 1.5)


def test_bounds_follow_lr_over_eta0():
    opt = o.build("adabound", make_params(), lr=0.01, final_lr=0.1)
    group = opt.param_groups[0]
    assert group["eta0"] == 0.01 and "initial_lr" not in group  # torch's schedulers own initial_lr
    group["lr"] = 0.001
    lo, hi = opt.bounds(group, 10**9)
    assert lo == pytest.approx(0.01, rel=1e-5) and hi == pytest.approx(0.01, rel=1e-5)


def test_schedule_is_saved_with_the_state_dict():
    a = o.build("amsbound", make_params(), bound={"name": "linear", "horizon": 77})
    b = o.build("amsbound", make_params())
    b.load_state_dict(a.state_dict())
    assert b.param_groups[0]["bound"] == Linear(77).params() and b.param_groups[0]["eta0"] == 1e-3
    assert not math.isinf(Linear(77).upper(78))
