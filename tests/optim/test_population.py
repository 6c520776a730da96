"""Populations (``members=K``): member k of a population steps exactly as the same optimizer built alone on member k's
slice with member k's hyperparameters, for every name of the registry, at float64 (rtol ``RTOL`` over ``STEPS``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import optstudy.optim as o
from optstudy.errors import ConfigError
from tests.optim.cases import CASES, loss_at, make_params

K, STEPS = 3, 30
RTOL, ATOL = 1e-12, 1e-14  # the bound; the kernels see the same Python floats per member

# what differs between the members, per keyword (each list has K values); betas as K pairs
VARIED = {
    "momentum": [0.9, 0.5, 0.7], "dampening": [0.0, 0.0, 0.0], "eps": [1e-8, 1e-6, 1e-4], "alpha": [0.99, 0.9, 0.95],
    "rho": [0.9, 0.8, 0.95], "lr_decay": [0.0, 0.01, 0.1], "initial_accumulator_value": [0.0, 0.1, 0.5],
    "momentum_decay": [4e-3, 0.0, 0.05], "final_lr": [0.1, 0.05, 0.2], "gamma": [1e-3, 0.1, 1e-2],
    "betas": [(0.9, 0.999), (0.8, 0.99), (0.85, 0.995)],
}


def population_hparams(name: str, **extra) -> dict:
    """K members that differ in lr and in every other float keyword ``name`` takes."""
    hp = CASES[name].hparams[0]
    out = {"lr": [hp["lr"] * f for f in (0.5, 1.0, 2.0)]}
    out.update({k: v for k, v in VARIED.items() if k in o.defaults(name)})
    if name == "nesterov":
        out.pop("dampening")
    return {**out, **extra}


def member(hp: dict, k: int) -> dict:
    return {key: (v[k] if isinstance(v, list) else v) for key, v in hp.items()}


def stacked(params_per_member: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([ps[i].detach() for ps in params_per_member]).requires_grad_()
            for i in range(len(params_per_member[0]))]


def pop_loss(params, step: int) -> torch.Tensor:
    """The sum over members of each member's own loss (its slice of every parameter)."""
    return sum(loss_at([p[k] for p in params], step) for k in range(K))


def run(opt, params, loss, steps=STEPS, start=0, scheduler=None):
    out = []
    for t in range(start, start + steps):
        for p in params:
            p.grad = None
        loss(params, t).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        out.append([p.detach().clone() for p in params])
    return out


def assert_members_equal(pop, alone):
    for k, trajectory in enumerate(alone):
        for t, (xs, ys) in enumerate(zip(pop, trajectory, strict=True)):
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                torch.testing.assert_close(x[k], y, rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"member {k}, step {t + 1}, param {i}: {m}")


def compare(name, hp, impl="loop", scheduler=None):
    starts = [make_params(seed=k) for k in range(K)]
    params = stacked(starts)
    opt = o.build(name, params, members=K, impl=impl, **hp)
    pop = run(opt, params, pop_loss, scheduler=scheduler and scheduler(opt))
    alone = []
    for k in range(K):
        own = starts[k]
        single = o.build(name, own, impl=impl, **member(hp, k))
        alone.append(run(single, own, loss_at, scheduler=scheduler and scheduler(single)))
    assert_members_equal(pop, alone)
    return opt


@pytest.mark.parametrize("impl", ["loop", "compiled"])
@pytest.mark.parametrize("name", o.NAMES)
def test_a_member_equals_its_standalone_run(name, impl):
    compare(name, population_hparams(name), impl)


@pytest.mark.parametrize("name", o.NAMES)
def test_a_float32_member_equals_its_standalone_run_bit_for_bit(name):
    """At float32 the per-member numbers are float32 tensors, each rounded once as the standalone run's ops round its
    Python floats: the same bits. (As float64 tensors they made every op compute in float64 and round back: a few
    ulps apart, and a third of a K = 144 Adam step spent converting.)"""
    hp = population_hparams(name, weight_decay=[0.0, 0.1, 0.05])
    starts = [[p.detach().float().requires_grad_() for p in make_params(seed=k)] for k in range(K)]
    params = stacked(starts)
    pop = run(o.build(name, params, members=K, **hp), params, pop_loss, steps=10)
    for k in range(K):
        alone = run(o.build(name, starts[k], **member(hp, k)), starts[k], loss_at, steps=10)
        for t, (xs, ys) in enumerate(zip(pop, alone, strict=True)):
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                assert x.dtype == torch.float32 and torch.equal(x[k], y), f"member {k}, step {t + 1}, param {i}"


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("name", o.NAMES)
def test_with_weight_decay_per_member(name, decoupled):
    """One member without decay beside two with: the step switches decay off for it with the neutral value."""
    compare(name, population_hparams(name, weight_decay=[0.0, 0.1, 0.05], decoupled_weight_decay=decoupled))


@pytest.mark.parametrize("name", o.NAMES)
def test_a_scheduler_scales_every_members_lr(name):
    opt = compare(name, population_hparams(name),
                  scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5))
    expected = np.array(population_hparams(name)["lr"]) * 0.5 ** (STEPS // 7)
    np.testing.assert_allclose(opt.param_groups[0]["lr"], expected, rtol=1e-15)


@pytest.mark.parametrize("name", ["adam", "nadam", "adabound", "rmsprop"])
def test_lambda_lr_and_cosine_schedules(name):
    compare(name, population_hparams(name),
            scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t) ** 0.5))
    compare(name, population_hparams(name),
            scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_shared_hyperparameters_step_as_one_big_tensor(name):
    """Scalars only: the members still equal their standalone runs (nothing per member to stack)."""
    compare(name, dict(CASES[name].hparams[0]))


@pytest.mark.parametrize("name", ["adabound", "amsbound"])
def test_bound_schedule_parameters_per_member(name):
    hp = population_hparams(name, bound={"name": "exponential", "rate": [1e-3, 1e-2, 1e-1]})
    starts = [make_params(seed=k) for k in range(K)]
    params = stacked(starts)
    pop = run(o.build(name, params, members=K, **hp), params, pop_loss)
    alone = []
    for k in range(K):
        hk = {**member(hp, k), "bound": {"name": "exponential", "rate": hp["bound"]["rate"][k]}}
        alone.append(run(o.build(name, starts[k], **hk), starts[k], loss_at))
    assert_members_equal(pop, alone)


@pytest.mark.parametrize("name", o.NAMES)
def test_effective_lrs_and_histograms_are_per_member(name):
    hp = population_hparams(name)
    starts = [make_params(seed=k) for k in range(K)]
    params = stacked(starts)
    opt = o.build(name, params, members=K, **hp)
    run(opt, params, pop_loss, steps=5)
    hists = o.lr_histogram(opt)
    assert isinstance(hists, list) and len(hists) == K
    for k in range(K):
        single = o.build(name, starts[k], **member(hp, k))
        run(single, starts[k], loss_at, steps=5)
        for x, y in zip(opt.effective_lrs(), single.effective_lrs(), strict=True):
            torch.testing.assert_close(x[k].to(y.dtype), y, rtol=1e-12, atol=0)
        alone = o.lr_histogram(single)
        assert torch.equal(hists[k].counts, alone.counts)
        torch.testing.assert_close(hists[k].min, alone.min)
        if alone.clipped_lower is not None:
            torch.testing.assert_close(hists[k].clipped_lower, alone.clipped_lower)
            torch.testing.assert_close(hists[k].clipped_upper, alone.clipped_upper)


@pytest.mark.parametrize("name", o.NAMES)
def test_state_dict_round_trip_continues_every_member(name):
    hp = population_hparams(name)
    params = stacked([make_params(seed=k) for k in range(K)])
    opt = o.build(name, params, members=K, **hp)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    run(opt, params, pop_loss, steps=10, scheduler=sched)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in params]}, buf)
    whole = run(opt, params, pop_loss, steps=10, start=10, scheduler=sched)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain data only, as Lightning checkpoints need
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = o.build(name, resumed, members=K, **hp)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    again = run(opt2, resumed, pop_loss, steps=10, start=10, scheduler=sched2)
    for xs, ys in zip(whole, again):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    np.testing.assert_array_equal(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])


@pytest.mark.parametrize("name", ["adam", "nadam", "adabound"])
def test_a_group_added_later_has_its_own_members(name):
    hp = population_hparams(name)
    starts = [make_params(seed=k) for k in range(K)]
    params = stacked(starts)
    opt = o.build(name, params[:2], members=K, **hp)
    extra_lr = [x * 3 for x in hp["lr"]]
    opt.add_param_group({"params": params[2:], "lr": extra_lr})
    pop = run(opt, params, pop_loss)
    alone = []
    for k in range(K):
        hk = member(hp, k)
        single = o.build(name, starts[k][:2], **hk)
        single.add_param_group({"params": starts[k][2:], "lr": extra_lr[k]})
        alone.append(run(single, starts[k], loss_at))
    assert_members_equal(pop, alone)


@pytest.mark.parametrize("name", ["adam", "nadam", "sgd"])
def test_copies_step_like_the_original(name):
    import copy

    params = stacked([make_params(seed=k) for k in range(K)])
    opt = o.build(name, params, members=K, **population_hparams(name))
    run(opt, params, pop_loss, steps=3)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = copy.deepcopy(opt)
    twin.param_groups[0]["params"] = twin_params
    twin.state = {q: copy.deepcopy(opt.state[p]) for p, q in zip(params, twin_params)}
    a, b = run(opt, params, pop_loss, 5, start=3), run(twin, twin_params, pop_loss, 5, start=3)
    assert torch.equal(a[-1][0], b[-1][0]) and twin.members == K


def test_torch_compile_around_the_step():
    """A function calling ``step()`` under torch.compile: per-member scalars as tensors, one graph."""
    hp = population_hparams("nadam")
    starts = [make_params(seed=k) for k in range(K)]
    params = stacked(starts)
    opt = o.build("nadam", params, members=K, **hp)
    step = torch.compile(opt.step)
    pop = run(type("Compiled", (), {"step": staticmethod(step)})(), params, pop_loss, steps=8)
    alone = [run(o.build("nadam", starts[k], **member(hp, k)), starts[k], loss_at, steps=8) for k in range(K)]
    assert_members_equal(pop, alone)


# -- mistakes ------------------------------------------------------------------------------------------------------
def test_a_bad_member_value_names_the_member():
    with pytest.raises(ConfigError, match=r"optimizer adam \(member 1 of 3\): lr must be a number >= 0, got -0.1"):
        o.build("adam", stacked([make_params(seed=k) for k in range(K)]), members=K, lr=[0.1, -0.1, 0.2])


@pytest.mark.parametrize("hp,message", [
    (dict(lr=[0.1, 0.2]), r"lr must be one number or a list of 3 numbers \(one per member\), got \[0.1, 0.2\]"),
    (dict(betas=[(0.9, 0.99)] * 2), r"betas must be a pair \(beta1, beta2\) or a list of 3 pairs"),
    (dict(amsgrad=[True, False, True]), None),
])
def test_wrong_member_counts_are_refused(hp, message):
    with pytest.raises(ConfigError, match=message or "amsgrad"):
        o.build("adam", stacked([make_params(seed=k) for k in range(K)]), members=K, **hp)


def test_a_flag_is_shared_by_the_population():
    with pytest.raises(ConfigError, match=r"rmsprop: centered is shared by the population"):
        o.check("rmsprop", members=K, centered=[True, False, True])


def test_the_member_axis_is_checked():
    with pytest.raises(ConfigError, match=r"with members=4, dim 0 of every parameter is the member axis; "
                                          r"parameter 0 of group 0 has shape \(3, 5, 3\)"):
        o.build("adam", stacked([make_params(seed=k) for k in range(K)]), members=4)
    with pytest.raises(ConfigError, match=r"members must be an integer >= 1"):
        o.check("adam", members=0)


def test_the_compiled_step_is_one_graph_whatever_k():
    """Member count is a symbolic size: populations of 3 and of 5 members (and their per-member scalars) share the
    graph of their optimizer variant."""
    from torch._dynamo.utils import counters

    def steps(k):
        params = [torch.randn(k, 6, 4, requires_grad=True), torch.randn(k, 9, requires_grad=True)]
        opt = o.build("adam", params, members=k, impl="compiled", lr=[1e-3 * (i + 1) for i in range(k)])
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()

    steps(3)
    before = counters["stats"]["unique_graphs"]
    steps(5)
    steps(7)
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("impl", ["loop", "compiled"])
@pytest.mark.parametrize("name", o.NAMES)
def test_kept_members_go_on_exactly_after_the_others_are_dropped(name, impl):
    """``keep_members``: halfway, member 1 is dropped (parameters cut first, then the optimizer and its StepLR);
    members 0 and 2 end exactly where they end in the uncut population, lr schedule and state included."""
    hp = population_hparams(name)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)  # noqa: E731
    starts = [make_params(seed=k) for k in range(K)]
    full_params = stacked(starts)
    full = o.build(name, full_params, members=K, impl=impl, **hp)
    full_sched = sched(full)
    reference = run(full, full_params, pop_loss, scheduler=full_sched)[-1]
    params = stacked(starts)
    opt = o.build(name, params, members=K, impl=impl, **hp)
    scheduler = sched(opt)
    run(opt, params, pop_loss, steps=STEPS // 2, scheduler=scheduler)
    keep = [0, 2]
    before = o.lr_histogram(opt)
    for p in params:
        p.grad = None
        torch.utils.swap_tensors(p, p.detach()[keep].clone().requires_grad_())
    opt.keep_members(keep, schedulers=[scheduler])
    assert opt.members == 2 and len(opt.param_groups[0]["lr"]) == 2
    after = o.lr_histogram(opt)  # from the last step's scalars, cut too (before the next step)
    assert all(torch.equal(after[i].counts, before[k].counts) for i, k in enumerate(keep))
    kept_loss = lambda ps, t: sum(loss_at([p[i] for p in ps], t) for i in range(len(keep)))  # noqa: E731
    last = run(opt, params, kept_loss, steps=STEPS - STEPS // 2, start=STEPS // 2, scheduler=scheduler)[-1]
    for i, (x, y) in enumerate(zip(last, reference, strict=True)):
        torch.testing.assert_close(x, y[keep], rtol=RTOL, atol=ATOL, msg=lambda m: f"param {i}: {m}")
    np.testing.assert_allclose(opt.param_groups[0]["lr"], np.array(hp["lr"])[keep] * 0.5 ** (STEPS // 7),
                               rtol=1e-15)
    state = opt.state_dict()  # and it saves and loads as a population of two
    again = o.build(name, stacked([[p[i].detach() for p in params] for i in range(2)]), members=2, impl=impl,
                    **{k: (np.array(v)[keep].tolist() if isinstance(v, list) else v) for k, v in hp.items()})
    again.load_state_dict(state)


def test_keep_members_refuses_what_it_cannot_do():
    params = stacked([make_params(seed=k) for k in range(K)])
    opt = o.build("adam", params, members=K, lr=[1e-3, 2e-3, 3e-3])
    with pytest.raises(ConfigError, match=r"increasing member indices in \[0, 3\).*\[2, 0\]"):
        opt.keep_members([2, 0])
    with pytest.raises(ConfigError, match="cut the parameters to the kept members first"):
        opt.keep_members([0, 2])
