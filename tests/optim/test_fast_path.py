"""The compiled step equals the readable eager loop, without recompiling as lr, bounds and bias corrections move."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import optstudy.optim as o
from optstudy.optim import _base, _compiled
from tests.optim.cases import CASES, assert_same, case_params, make_params, trajectory
from tests.optim.test_reference import skipping_trajectory


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [8, 2], ids=["one-chunk", "two-chunks"])
@pytest.mark.parametrize("name,hp", case_params())
def test_compiled_equals_loop(name, hp, chunk, monkeypatch):
    """Three tensors go through compiled chunks (padded to the chunk size) and the 0-d one through the eager kernel;
    with ``chunk=2`` the second call is half padding."""
    monkeypatch.setattr(_compiled, "CHUNK", chunk)
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
    # one graph, whatever the step: the first step of momentum SGD is the same code with other numbers
    assert graphs == 1, dict(counters["stats"])
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


def test_a_failing_compile_falls_back_to_the_loop(monkeypatch, caplog):
    def broken(*args):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(_compiled, "_runner", broken)
    fast, slow = make_params(), make_params()
    hp = CASES["adam"].hparams[0]
    opt = o.build("adam", fast, impl="compiled", **hp)
    assert_same(trajectory(opt, fast, 3), trajectory(o.build("adam", slow, impl="loop", **hp), slow, 3))
    assert opt.impl == "loop"
    assert "no C++ compiler" in caplog.text


def _layouts(seed):
    """Tensors the compiled path must route correctly: channels-last, a transposed (non-contiguous) view, float32
    beside float64, one element, and enough of them for several chunks."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
    wide = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    params = [conv, wide.t(), torch.randn(9, generator=gen), torch.randn(1, generator=gen, dtype=torch.float64)]
    params += [torch.randn(n, generator=gen, dtype=torch.float64) for n in range(2, 14)]
    return [p.detach().requires_grad_() for p in params]


def _layout_grads(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam", "amsbound", "nadam", "adadelta"])
def test_compiled_handles_every_layout(name, monkeypatch):
    monkeypatch.setattr(_compiled, "CHUNK", 4)
    fast, slow = _layouts(0), _layouts(0)
    opt_f, opt_s = o.build(name, fast, impl="compiled"), o.build(name, slow, impl="loop")
    for k in range(4):
        _layout_grads(fast, k)
        _layout_grads(slow, k)
        opt_f.step()
        opt_s.step()
    assert opt_f.impl == "compiled"
    for x, y in zip(fast, slow):
        rtol = 1e-10 if x.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7)
        assert x.stride() == y.stride()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["momentum", "nadam", "amsbound"])
def test_compiled_equals_loop_when_parameters_skip_steps(name):
    """Tensors at different steps get their own scalars, hence their own compiled calls."""
    hp = CASES[name].hparams[0]
    fast, slow = make_params(), make_params()
    assert_same(skipping_trajectory(o.build(name, fast, impl="compiled", **hp), fast),
                skipping_trajectory(o.build(name, slow, impl="loop", **hp), slow))


@pytest.mark.slow
def test_compiled_step_does_not_keep_old_gradients_alive():
    """The aliases cached between steps hold the parameter and its state, never a gradient."""
    import gc
    import weakref

    p = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    opt = o.build("adam", [p], impl="compiled")
    p.grad = torch.randn(1000, dtype=torch.float64)
    first = weakref.ref(p.grad)
    opt.step()
    p.grad = torch.randn(1000, dtype=torch.float64)
    opt.step()
    gc.collect()
    assert opt.impl == "compiled"
    assert first() is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["momentum", "adagrad", "adadelta", "nadam", "amsbound"])
def test_compiled_equals_loop_with_maximize_a_tensor_lr_and_complex(name):
    """The torch.optim features that reach the compiled step: a negated gradient, an lr that is a tensor (its value
    enters the scalars tensor, never a new graph), complex tensors as real views."""
    from tests.optim.test_torch_compat import _complex_params, _complex_trajectory

    def run(impl, params):
        opt = o.build(name, params, impl=impl, maximize=True, lr=torch.tensor(0.01))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return opt, trajectory(opt, params, 6, scheduler=sched)

    torch._dynamo.reset()
    counters.clear()
    (opt, a), (_, b) = run("compiled", make_params()), run("loop", make_params())
    assert opt.impl == "compiled" and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert_same(a, b)
    cplx, twin = _complex_params(), _complex_params()
    assert_same(_complex_trajectory(o.build(name, cplx, impl="compiled"), cplx, 5),
                _complex_trajectory(o.build(name, twin, impl="loop"), twin, 5))


@pytest.mark.slow
def test_a_torch_state_dict_does_not_grow_compiled_runners():
    """torch's float32 tensor ``step`` used to reach the scalars as a tensor: one new runner (and graph) per tensor
    per step, steps 5-8x slower."""
    ref_params, fast, slow = make_params(), make_params(), make_params()
    ref = torch.optim.Adam(ref_params, lr=0.01, foreach=False)
    trajectory(ref, ref_params, 3)
    saved = ref.state_dict()
    for s in saved["state"].values():
        s["step"] = s["step"].float()
    opt_f, opt_s = o.build("adam", fast, impl="compiled", lr=0.01), o.build("adam", slow, impl="loop", lr=0.01)
    opt_f.load_state_dict(copy.deepcopy(saved))  # loading keeps the saved buffers: one copy each
    opt_s.load_state_dict(copy.deepcopy(saved))
    before = len(_compiled._runners)
    assert_same(trajectory(opt_f, fast, 10, start=3), trajectory(opt_s, slow, 10, start=3))
    assert len(_compiled._runners) - before <= 1
