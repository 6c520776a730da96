"""Gradient noise (``grad_noise=...``, Neelakantan et al. 2015; ``optstudy.optim._noise``) for every optimizer of
the registry: the update equals the optimizer applied to the hand-noised gradient ``g + σ_t·z`` (float64, exact),
the noise has variance ``η/(1+t)^γ`` with t from 0, off leaves the optimizer as it was, a population member's noise
is its standalone run's, and a resumed run continues the same stream."""

from __future__ import annotations

import io
import math

import pytest
import torch

import optstudy.optim as o
from optstudy.errors import ConfigError
from optstudy.optim import _noise
from tests.optim.cases import CASES, loss_at, make_params, set_grads

STEPS = 12
NOISE = {"eta": 0.3, "gamma": 0.55, "seed": 7}


def hand_noised_trajectory(name, hp, params, noise, steps=STEPS, impl="loop"):
    """The optimizer *without* noise, stepping on gradients noised here: g + sqrt(η/(1+t)^γ) · z, z the group's
    parameters' numbers in order, from one generator seeded with the documented key (seed, first index 0, t from 0)."""
    opt = o.build(name, params, impl=impl, **hp)
    out = []
    for t in range(steps):
        set_grads(params, t)
        gen = torch.Generator().manual_seed(_noise.key(noise["seed"], 0, t))
        z = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=params[0].dtype)
        for p, piece in zip(params, z.split([p.numel() for p in params])):
            p.grad = p.grad + piece.view(p.shape) * math.sqrt(noise["eta"] / (1 + t) ** noise["gamma"])
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def noisy_trajectory(name, hp, params, noise, steps=STEPS, impl="loop", start=0, opt=None):
    opt = opt or o.build(name, params, impl=impl, grad_noise=noise, **hp)
    out = []
    for t in range(start, start + steps):
        set_grads(params, t)
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def assert_equal(a, b, rtol=0.0, atol=0.0):
    for t, (xs, ys) in enumerate(zip(a, b, strict=True)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, t=t, i=i: f"step {t + 1}, param {i}: {m}")


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("name", o.NAMES)
def test_the_update_is_the_optimizer_on_the_noised_gradient(name, maximize):
    """Exact (bit-equal) at float64: the noise enters only as ``g + σ_t·z``, before maximize's negation."""
    hp = {**CASES[name].hparams[-1], "maximize": maximize}  # the last case: weight decay and the other branches
    hp.pop("bound", None)
    noisy = noisy_trajectory(name, hp, make_params(), NOISE)
    hand = hand_noised_trajectory(name, hp, make_params(), NOISE)
    assert_equal(noisy, hand)
    plain = hand_noised_trajectory(name, hp, make_params(), {**NOISE, "eta": 0.0})
    assert not torch.equal(noisy[-1][0], plain[-1][0])  # the noise did something


@pytest.mark.parametrize("name", ["sgd", "adam", "adabound", "adadelta"])
def test_the_compiled_step_adds_the_same_noise(name):
    hp = dict(CASES[name].hparams[0])
    noisy = noisy_trajectory(name, hp, make_params(), NOISE, steps=5, impl="compiled")
    hand = hand_noised_trajectory(name, hp, make_params(), NOISE, steps=5, impl="compiled")
    assert_equal(noisy, hand)
    loop = noisy_trajectory(name, hp, make_params(), NOISE, steps=5, impl="loop")
    assert_equal(noisy, loop, rtol=1e-12, atol=1e-14)  # the compiled kernel reorders a few products


@pytest.mark.parametrize("t", [0, 9, 99])
def test_the_noise_has_variance_eta_over_one_plus_t_to_the_gamma(t):
    """Plain SGD with lr 1 on a zero gradient moves by minus the noise: its sample variance over 2e5 elements is
    η/(1+t)^γ (t counted from 0: the first step's variance is η) within 2% (the estimate's relative standard error
    is sqrt(2/n) = 0.3%), its mean 0 within 5 standard errors."""
    n, eta, gamma = 200_000, 0.3, 0.55
    p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = o.build("sgd", [p], lr=1.0, grad_noise={"eta": eta, "gamma": gamma, "seed": 1})
    for _ in range(t + 1):
        before = p.detach().clone()
        p.grad = torch.zeros_like(p)
        opt.step()
    step = before - p.detach()
    expected = eta / (1 + t) ** gamma
    assert step.var().item() == pytest.approx(expected, rel=0.02)
    assert abs(step.mean().item()) < 5 * math.sqrt(expected / n)


@pytest.mark.parametrize("noise", [None, {"eta": 0.0}, {"eta": None, "gamma": 0.55}], ids=["none", "zero", "null"])
@pytest.mark.parametrize("name", o.NAMES)
def test_off_leaves_the_optimizer_as_it_was(name, noise):
    hp = dict(CASES[name].hparams[0])
    with_key = o.build(name, make_params(), grad_noise=noise, **hp)
    assert "grad_noise" not in with_key.param_groups[0] and "grad_noise" not in with_key.defaults
    a = noisy_trajectory(name, hp, make_params(), noise, steps=5)
    b = noisy_trajectory(name, hp, params := make_params(), None, steps=5, opt=o.build(name, params, **hp))
    assert_equal(a, b)


def test_different_seeds_and_parameters_draw_different_noise():
    keys = {_noise.key(s, i, t) for s in range(3) for i in range(3) for t in range(3)}
    assert len(keys) == 27
    like = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(_noise.draw(5, 2, 3, 4, like), _noise.draw(5, 2, 3, 4, like))  # a pure function
    assert not torch.equal(_noise.draw(5, 2, 3, 4, like), _noise.draw(6, 2, 3, 4, like))


def test_a_parameter_without_a_gradient_and_a_second_group():
    """A parameter without gradient takes no noise and its step count stays behind; a later group draws with its
    first parameter's index: each (group, step count) is one draw, split in parameter order."""
    params = make_params()
    opt = o.build("sgd", params[:3], lr=1.0, grad_noise=NOISE)
    opt.add_param_group({"params": params[3:]})
    hand = [p.detach().clone() for p in params]
    for t in range(3):
        set_grads(params, t)
        if t == 1:
            params[1].grad = None  # params 0 and 2 at t=1, param 1 left at step count 1 (its t is 1 next time)
        counts = [opt.state[p]["step"] if opt.state[p] else 0 for p in params]
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        buckets = {}
        for i, g in enumerate(grads):
            if g is not None:
                buckets.setdefault((i >= 3, counts[i]), []).append(i)
        for (_, count), index in buckets.items():
            gen = torch.Generator().manual_seed(_noise.key(NOISE["seed"], index[0], count))
            z = torch.randn(sum(grads[i].numel() for i in index), generator=gen)
            for i, piece in zip(index, z.split([grads[i].numel() for i in index])):
                noisy = grads[i] + piece.view(grads[i].shape) * math.sqrt(0.3 / (1 + count) ** 0.55)
                hand[i] = hand[i] - noisy
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), hand[i], rtol=0, atol=0, msg=f"step {t}, param {i}")
    assert [opt.state[p]["step"] for p in params] == [3, 2, 3, 3]


def test_complex_parameters_get_noise_on_both_parts():
    p = torch.zeros(50_000, dtype=torch.complex128, requires_grad=True)
    opt = o.build("sgd", [p], lr=1.0, grad_noise={"eta": 1.0, "seed": 0})
    p.grad = torch.zeros_like(p)
    opt.step()
    step = torch.view_as_real(p.detach())
    assert step[:, 0].var().item() == pytest.approx(1.0, rel=0.05)
    assert step[:, 1].var().item() == pytest.approx(1.0, rel=0.05)


# -- populations -----------------------------------------------------------------------------------------------------
K = 3
ETAS, SEEDS = [0.3, 0.0, 1.0], [0, 1, 2]  # member 1 without noise


def stacked(starts):
    return [torch.stack([ps[i].detach() for ps in starts]).requires_grad_() for i in range(len(starts[0]))]


def pop_trajectory(opt, params, steps=STEPS, start=0):
    out = []
    for t in range(start, start + steps):
        for p in params:
            p.grad = None
        sum(loss_at([p[k] for p in params], t) for k in range(len(params[0]))).backward()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("form", ["dict_of_lists", "list_of_dicts"])
@pytest.mark.parametrize("name", o.NAMES)
def test_a_members_noise_is_its_standalone_runs(name, form):
    """Member k (its own eta, seed and lr) steps as its standalone run with its own grad_noise, rtol 1e-12 (the
    population's scalars are its standalone run's Python floats; the noise is drawn per member, bit-equal)."""
    hp = dict(CASES[name].hparams[0])
    lrs = [hp["lr"] * f for f in (0.5, 1.0, 2.0)]
    if form == "dict_of_lists":
        noise = {"eta": ETAS, "gamma": 0.55, "seed": SEEDS}
    else:  # what population.task.member_kwargs passes when members differ
        noise = [{"eta": e, "gamma": 0.55, "seed": s} for e, s in zip(ETAS, SEEDS)]
    starts = [make_params(seed=10 + k) for k in range(K)]
    params = stacked(starts)
    pop = pop_trajectory(o.build(name, params, members=K, **{**hp, "lr": lrs}, grad_noise=noise), params)
    for k in range(K):
        own = make_params(seed=10 + k)
        alone = noisy_trajectory(name, {**hp, "lr": lrs[k]}, own, {"eta": ETAS[k], "seed": SEEDS[k]})
        assert_equal([[x[k] for x in xs] for xs in pop], alone, rtol=1e-12, atol=1e-14)


def test_kept_members_keep_their_own_noise():
    hp = {"lr": 0.01}
    noise = {"eta": [0.3, 0.5, 1.0], "seed": SEEDS}
    starts = [make_params(seed=10 + k) for k in range(K)]
    params = stacked(starts)
    opt = o.build("adam", params, members=K, grad_noise=noise, **hp)
    pop_trajectory(opt, params, steps=3)
    keep = [0, 2]
    for p in params:
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach()[keep]))
    opt.keep_members(keep)
    assert opt.param_groups[0]["grad_noise"]["seed"].tolist() == [0, 2]
    after = pop_trajectory(opt, params, steps=3, start=3)
    alone = noisy_trajectory("adam", hp, make_params(seed=12), {"eta": 1.0, "seed": 2}, steps=6)
    torch.testing.assert_close(after[-1][0][1], alone[-1][0], rtol=1e-12, atol=1e-14)


# -- checkpoints -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("members", [None, K], ids=["alone", "population"])
@pytest.mark.parametrize("name", ["sgd", "adam", "nadam", "adabound"])
def test_a_resumed_run_continues_the_same_noise(name, members):
    """Saved after 6 steps (torch.save, loaded with weights_only=True as Lightning does), the resumed optimizer's next
    6 steps equal the uninterrupted run's, bit for bit: the noise is a function of (seed, index, step count)."""
    hp = dict(CASES[name].hparams[0])
    noise = {"eta": [0.3, 0.5, 1.0], "seed": SEEDS} if members else NOISE

    def fresh(params):
        return o.build(name, params, members=members, grad_noise=noise, **hp)

    def steps(opt, params, start):
        if members:
            return pop_trajectory(opt, params, steps=6, start=start)
        return noisy_trajectory(name, hp, params, noise, steps=6, start=start, opt=opt)

    params = stacked([make_params(seed=k) for k in range(K)]) if members else make_params()
    opt = fresh(params)
    steps(opt, params, 0)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buf)
    whole = steps(opt, params, 6)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = o.build(name, resumed, members=members, **hp)  # built without noise: the state dict brings it
    opt2.load_state_dict(saved["opt"])
    assert_equal(whole, steps(opt2, resumed, 6))


def test_torch_compile_around_the_step_draws_the_same_noise():
    params = make_params()
    opt = o.build("adam", params, lr=0.01, grad_noise=NOISE)
    step = torch.compile(opt.step)
    compiled = noisy_trajectory("adam", {}, params, NOISE, steps=4,
                                opt=type("Compiled", (), {"step": staticmethod(step)})())
    assert_equal(compiled, noisy_trajectory("adam", {"lr": 0.01}, make_params(), NOISE, steps=4),
                 rtol=1e-12, atol=1e-14)


# -- mistakes --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise, message", [
    ({"eta": -0.1}, r"optimizer adam: grad_noise.eta must be a number >= 0 or null \(off\), got -0.1"),
    ({"eta": 0.3, "gamma": -1}, r"grad_noise.gamma must be a number >= 0, got -1"),
    ({"eta": 0.3, "seed": -1}, r"grad_noise.seed must be an integer in \[0, 2\*\*32 - 1\], got -1"),
    ({"eta": 0.3, "seed": 1.5}, r"grad_noise.seed must be an integer"),
    ({"eta": 0.3, "sigma": 1}, r"grad_noise has no key 'sigma'; its keys: eta, gamma, seed"),
    ({"eta": [0.1, 0.2]}, r"grad_noise.eta must be one value \(lists are for populations\)"),
    (0.3, r"grad_noise must be a mapping with eta, gamma, seed \(or null\), got 0.3"),
])
def test_bad_values_name_the_key_the_rule_and_the_value(noise, message):
    with pytest.raises(ConfigError, match=message):
        o.build("adam", make_params(), grad_noise=noise)
    with pytest.raises(ConfigError, match=message):
        o.check("adam", grad_noise=noise)  # the config check, without parameters


def test_a_population_needs_one_value_per_member():
    with pytest.raises(ConfigError, match=r"grad_noise.eta must be one per member \(3\), got \[0.1, 0.2\]"):
        o.build("sgd", stacked([make_params(seed=k) for k in range(K)]), members=K, grad_noise={"eta": [0.1, 0.2]})


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = o.build("sgd", emb.parameters(), lr=0.1, grad_noise=NOISE)
    with pytest.raises(ConfigError, match="grad_noise with sparse gradients is not supported"):
        opt.step()
