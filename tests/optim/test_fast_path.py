"""The compiled step equals the readable eager loop, without recompiling as lr, bounds and bias corrections move."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import optstudy.optim as o
from optstudy.optim import _base
from tests.optim.cases import CASES, assert_same, case_params, make_params, trajectory


@pytest.mark.slow
@pytest.mark.parametrize("bucket", [True, False], ids=["bucketed", "per-tensor"])
@pytest.mark.parametrize("name,hp", case_params())
def test_compiled_equals_loop(name, hp, bucket, monkeypatch):
    """Small tensors share one compiled call (bucketed); large ones get their own (per-tensor)."""
    if not bucket:
        monkeypatch.setattr(_base, "BUCKET_NUMEL", 0)
    fast, slow = make_params(), make_params()
    opt_f, opt_s = o.build(name, fast, impl="compiled", **hp), o.build(name, slow, impl="loop", **hp)
    sched_f = torch.optim.lr_scheduler.ExponentialLR(opt_f, gamma=0.9)
    sched_s = torch.optim.lr_scheduler.ExponentialLR(opt_s, gamma=0.9)
    torch._dynamo.reset()
    counters.clear()
    a = trajectory(opt_f, fast, 3, scheduler=sched_f)
    graphs = counters["stats"]["unique_graphs"]
    a += trajectory(opt_f, fast, 22, start=3, scheduler=sched_f)
    b = trajectory(opt_s, slow, 25, scheduler=sched_s)
    assert opt_f.impl == "compiled", "fell back to the loop"
    assert 0 < graphs <= 3, "compiled graphs: at most static, dynamic, size-1 tensor"
    # lr, bias corrections and bounds change every step without recompiling
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert_same(a, b)
    for x, y in zip(opt_f.effective_lrs(), opt_s.effective_lrs()):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=0)


@pytest.mark.slow
def test_compiled_float32_matches_loop_closely():
    fast = [p.detach().float().requires_grad_() for p in make_params()]
    slow = [p.detach().float().requires_grad_() for p in make_params()]
    a = trajectory(o.build("amsbound", fast, impl="compiled", lr=0.01), fast, 20)
    b = trajectory(o.build("amsbound", slow, impl="loop", lr=0.01), slow, 20)
    assert_same(a, b, rtol=1e-5, atol=1e-6)


def test_auto_compiles_only_large_models(monkeypatch):
    monkeypatch.delenv("OPTSTUDY_OPTIM_IMPL", raising=False)
    assert o.build("adam", make_params()).impl == "loop"
    big = torch.zeros(_base.AUTO_COMPILE_NUMEL, requires_grad=True)
    assert o.build("adam", [big]).impl == "compiled"
    monkeypatch.setenv("OPTSTUDY_OPTIM_IMPL", "loop")
    assert o.build("adam", [big]).impl == "loop"


def test_a_failing_compile_falls_back_to_the_loop(monkeypatch):
    def broken(kernel):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(_base, "_compile", broken)
    fast, slow = make_params(), make_params()
    hp = CASES["adam"].hparams[0]
    opt = o.build("adam", fast, impl="compiled", **hp)
    assert_same(trajectory(opt, fast, 3), trajectory(o.build("adam", slow, impl="loop", **hp), slow, 3))
    assert opt.impl == "loop"
