"""Every optimizer works wherever code handles it as a torch.optim optimizer: copies, old checkpoints, torch's state
dicts, LR schedulers, complex parameters, ``torch.compile`` around the step, rebuilding from ``defaults``,
``maximize``, a tensor lr, torch's implementation switches and sparse gradients.

Each test is parametrized by ``subject``: ``"ours"`` is the test proper; ``"reference"`` runs the same code on the
reference (torch.optim, or the AdaBound authors' code) to show that it is the behaviour torch users expect. Where the
authors' AdaBound lacks a feature, its reference run is skipped with the reason. Tolerances: ``cases.RTOL/ATOL``.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch._dynamo.utils import counters

import optstudy.optim as o
from optstudy.errors import ConfigError
from tests.optim.cases import CASES, assert_same, make_params, set_grads, trajectory

SUBJECTS = ["ours", "reference"]
TORCH_NAMES = [n for n in o.NAMES if n not in ("adabound", "amsbound")]
STEPS = 12


def make(subject, name, params, **hp):
    hp = {**CASES[name].hparams[0], **hp}
    return o.build(name, params, impl="loop", **hp) if subject == "ours" else CASES[name].reference(params, **hp)


def skip_authors(subject, name, why):
    if subject == "reference" and name in ("adabound", "amsbound"):
        pytest.skip(f"the authors' AdaBound {why}")


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def continue_both(a, b, steps=STEPS, start=5):
    """Steps ``a`` and ``b`` on the same gradients (each on its own parameters) and asserts equal trajectories."""
    assert_same(trajectory(a, params_of(a), steps, start=start), trajectory(b, params_of(b), steps, start=start))


# -- copies ------------------------------------------------------------------------------------------------------
def _torch_save(opt):
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda opt: pickle.loads(pickle.dumps(opt)), "torch.save": _torch_save}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", o.NAMES)
def test_a_copy_steps_like_the_original(name, subject, how):
    skip_authors(subject, name, "keeps η0 in base_lrs, which torch's __getstate__ drops: its copies cannot step")
    params = make_params()
    opt = make(subject, name, params)
    trajectory(opt, params, 5)
    twin = COPIES[how](opt)
    assert all(p is not q for p, q in zip(params_of(twin), params))  # the copy has its own parameters
    continue_both(opt, twin)


def test_a_copy_keeps_its_impl():
    twin = copy.deepcopy(o.build("adam", make_params(), impl="compiled"))
    assert twin.impl == "compiled"


# -- checkpoints -------------------------------------------------------------------------------------------------
def _without_defaults(state_dict, defaults):
    """``state_dict`` as code from before each default-valued key existed would have saved it."""
    saved = copy.deepcopy(state_dict)
    for group in saved["param_groups"]:
        for key in [k for k, v in group.items() if k in defaults and v == defaults[k] and k != "lr"]:
            del group[key]
    return saved


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", o.NAMES)
def test_a_checkpoint_from_before_a_key_existed_loads_with_its_default(name, subject):
    skip_authors(subject, name, "has no defaults on load: a key missing from a group fails in its step")
    params, resumed = make_params(), make_params()
    opt = make(subject, name, params)
    trajectory(opt, params, 5)
    if subject == "ours":
        # every hyperparameter at its default, the implementation switches, and (AdaBound) eta0: all added since
        dropped = {**o.REGISTRY[name].DEFAULTS, **o.REGISTRY[name].TORCH_FLAGS}
    else:  # torch fills these on load (its optimizers' __setstate__)
        dropped = dict(maximize=False, foreach=None, differentiable=False)
    saved = _without_defaults(opt.state_dict(), dropped)
    with torch.no_grad():
        for p, q in zip(resumed, params):
            p.copy_(q)
    other = make(subject, name, resumed, lr=123.0)
    other.load_state_dict(saved)
    continue_both(opt, other)


@pytest.mark.parametrize("name", ["adabound", "amsbound"])
def test_an_old_adabound_checkpoint_keeps_eta0_from_initial_lr(name):
    """optstudy kept η0 under ``initial_lr`` before it moved to a key of its own."""
    params, resumed = make_params(), make_params()
    opt = o.build(name, params, impl="loop", lr=0.02, final_lr=0.1)
    trajectory(opt, params, 5)
    opt.param_groups[0]["lr"] = 0.01  # as a scheduler would
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["initial_lr"] = saved["param_groups"][0].pop("eta0")
    with torch.no_grad():
        for p, q in zip(resumed, params):
            p.copy_(q)
    other = o.build(name, resumed, impl="loop", lr=0.5)
    other.load_state_dict(saved)
    assert other.param_groups[0]["eta0"] == 0.02
    continue_both(opt, other)


@pytest.mark.parametrize("direction", ["torch into ours", "ours into torch"])
@pytest.mark.parametrize("name", o.NAMES)
def test_state_dicts_load_both_ways_and_continue(name, direction):
    """torch's format: ``step`` a tensor, no ``step`` for SGD's momentum, no second Adadelta buffer, keys of its own
    (``foreach``, ``maximize``, ...). The authors' AdaBound stands in for torch for adabound/amsbound."""
    source_params, params = make_params(), make_params()
    ours_first = direction == "ours into torch"
    source = make("ours" if ours_first else "reference", name, source_params)
    trajectory(source, source_params, 5)
    with torch.no_grad():
        for p, q in zip(params, source_params):
            p.copy_(q)
    target = make("reference" if ours_first else "ours", name, params, lr=CASES[name].hparams[0]["lr"])
    target.load_state_dict(copy.deepcopy(source.state_dict()))  # as from a file: no shared buffers
    if not ours_first:
        assert all(type(s["step"]) is int for s in target.state.values())
    continue_both(source, target)


def test_a_float32_tensor_step_becomes_a_number():
    """torch keeps ``step`` in the default dtype: a float32 ``1-β2^t`` was off by 1e-5 relative."""
    params, ref_params = make_params(), make_params()
    ref = torch.optim.Adam(ref_params, lr=0.01, foreach=False)
    trajectory(ref, ref_params, 3)
    saved = ref.state_dict()
    for s in saved["state"].values():
        s["step"] = s["step"].float()
    opt = o.build("adam", params, impl="loop", lr=0.01)
    opt.load_state_dict(saved)
    assert [s["step"] for s in opt.state.values()] == [3] * len(params)


# -- schedulers --------------------------------------------------------------------------------------------------
def _schedulers(opt, lr):
    momentum = "betas" in opt.defaults or opt.defaults.get("momentum", 0) > 0
    return {
        "OneCycleLR": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3 * lr, total_steps=STEPS + 2,
                                                                  cycle_momentum=momentum, base_momentum=0.8),
        "CyclicLR": lambda: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=lr / 4, max_lr=2 * lr, step_size_up=3,
                                                              cycle_momentum=momentum, base_momentum=0.8,
                                                              max_momentum=0.9),
        "LambdaLR": lambda: _lambda_after_lr_change(opt, lr),
        "StepLR": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        "ReduceLROnPlateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    }


def _lambda_after_lr_change(opt, lr):
    for group in opt.param_groups:
        group["lr"] = 2 * lr  # changed before the scheduler exists: LambdaLR starts from it
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch)


def _scheduled(name, subject, scheduler, params):
    lr = CASES[name].hparams[0]["lr"]
    opt = make(subject, name, params)
    sched = _schedulers(opt, lr)[scheduler]()
    out = []
    for k in range(STEPS):
        set_grads(params, k)
        opt.step()
        if scheduler == "ReduceLROnPlateau":
            sched.step(1.0)  # never improves: lr halves every step after the first
        else:
            sched.step()
        out.append([p.detach().clone() for p in params])
    return opt, out


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR", "LambdaLR", "StepLR", "ReduceLROnPlateau"])
@pytest.mark.parametrize("name", o.NAMES)
def test_lr_schedulers_give_the_reference_trajectory(name, scheduler):
    """For AdaBound the bounds follow lr/η0 with η0 fixed at construction, as in the authors' code, whatever a
    scheduler writes into ``initial_lr`` (OneCycleLR: max_lr/div_factor) or resets lr from; momentum/β1 cycling
    included."""
    ours, ref = make_params(), make_params()
    opt, a = _scheduled(name, "ours", scheduler, ours)
    _, b = _scheduled(name, "reference", scheduler, ref)
    assert_same(a, b)
    if name in ("adabound", "amsbound"):
        assert opt.param_groups[0]["eta0"] == CASES[name].hparams[0]["lr"]


@pytest.mark.parametrize("name", ["sgd", "rmsprop"])
def test_a_scheduler_may_switch_momentum_on(name):
    """OneCycleLR cycles the momentum of any optimizer whose defaults have one, from 0 too: the buffer appears."""
    ours, ref = make_params(), make_params()

    def run(subject, params):
        opt = make(subject, name, params)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 2)
        return trajectory(opt, params, STEPS, scheduler=sched)

    assert_same(run("ours", ours), run("reference", ref))


# -- complex parameters ------------------------------------------------------------------------------------------
def _complex_params():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=gen, dtype=torch.complex128).requires_grad_() for s in [(4, 3), (5,), ()]]


def _complex_trajectory(opt, params, steps=STEPS):
    """Gradients that depend on θ (so differences compound), given as complex or as their real views."""
    out, gen = [], torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            shape = p.shape if p.is_complex() else p.shape[:-1]
            noise = torch.randn(shape, generator=gen, dtype=torch.complex128)
            g = noise + 0.3 * p.detach() if p.is_complex() else torch.view_as_real(noise) + 0.3 * p.detach()
            p.grad = g
        opt.step()
        out.append([(torch.view_as_real(p) if p.is_complex() else p).detach().clone() for p in params])
    return out


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", o.NAMES)
def test_complex_parameters_step_as_their_real_views(name, subject):
    """As torch does: real and imaginary parts are two elements (``g*g`` would not be ``|g|²``)."""
    skip_authors(subject, name, "squares complex gradients (g*g, not |g|²)")
    cplx = _complex_params()
    real = [torch.view_as_real(p.detach().clone()).requires_grad_() for p in cplx]
    opt_c, opt_r = make(subject, name, cplx), make(subject, name, real)
    assert_same(_complex_trajectory(opt_c, cplx), _complex_trajectory(opt_r, real))
    if subject == "ours":
        for x, y in zip(opt_c.effective_lrs(), opt_r.effective_lrs(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=0)
        assert o.lr_histogram(opt_c).counts.sum() == sum(p.numel() * 2 for p in cplx)


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_complex_parameters_equal_torch(name):
    ours, ref = _complex_params(), _complex_params()
    assert_same(_complex_trajectory(make("ours", name, ours), ours),
                _complex_trajectory(make("reference", name, ref), ref))


# -- torch.compile around the step -------------------------------------------------------------------------------
def _compiled_steps(opt, params, steps, eager_first=0, backend="inductor"):
    """Steps ``opt`` through ``torch.compile``; returns the trajectory and the graph count after each step."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda: opt.step(), backend=backend)
    out, graphs = [], []
    for k in range(steps):
        set_grads(params, k)
        opt.step() if k < eager_first else compiled()
        out.append([p.detach().clone() for p in params])
        graphs.append(counters["stats"]["unique_graphs"])
    return out, graphs


@pytest.mark.slow
@pytest.mark.parametrize("name", o.NAMES)
def test_torch_compile_around_step_compiles_once_and_equals_eager(name):
    """dynamo guarded on the integer step count and recompiled every step; under torch.compile the count lives in
    a tensor and the step is one graph, compiled on the first call."""
    fast, slow = make_params(), make_params()
    a, graphs = _compiled_steps(make("ours", name, fast, maximize=True), fast, 8)
    b = trajectory(make("ours", name, slow, maximize=True), slow, 8)
    assert graphs == [1] * 8, graphs
    assert_same(a, b)


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", ["adam", "nadam", "adabound"])
def test_torch_compile_after_eager_steps_or_a_load_does_not_recompile_after(name, subject):
    """A run resumed from a checkpoint (counts as numbers) and then compiled: one conversion, then no recompiles.
    dynamo's "eager" backend counts graphs without inductor's compile time."""
    skip_authors(subject, name, "is not the subject of this test")
    fast, slow = make_params(), make_params()
    a, graphs = _compiled_steps(make(subject, name, fast), fast, 8, eager_first=3, backend="eager")
    b = trajectory(make(subject, name, slow), slow, 8)
    assert graphs[3] > 0 and graphs[3:] == [graphs[3]] * 5, graphs
    assert_same(a, b)
    if subject == "ours":  # and back to eager: the counts are numbers again
        assert_same(trajectory(make("ours", name, fast), fast, 1), trajectory(make("ours", name, slow), slow, 1))


# -- rebuilding, maximize, tensor lr -----------------------------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", o.NAMES)
def test_rebuilding_from_defaults_gives_the_same_optimizer(name, subject):
    """``type(opt)(params, **opt.defaults)``, as Lightning and other libraries do: the flags a name fixes are in
    ``defaults`` and are accepted at their value."""
    a, b = make_params(), make_params()
    opt = make(subject, name, a)
    twin = type(opt)(b, **opt.defaults)
    assert_same(trajectory(opt, a, STEPS), trajectory(twin, b, STEPS))
    twin_of_copy = type(opt)(make_params(), **copy.deepcopy(opt).defaults) if subject == "ours" else None
    assert twin_of_copy is None or twin_of_copy.defaults == opt.defaults


def _negated(opt, params, steps=STEPS):
    out = []
    for k in range(steps):
        set_grads(params, k)
        for p in params:
            p.grad.neg_()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", o.NAMES)
def test_maximize_steps_on_g_like_minimizing_on_minus_g(name, subject):
    skip_authors(subject, name, "has no maximize")
    a, b = make_params(), make_params()
    hp = dict(weight_decay=0.1)  # torch negates g before adding the decay
    assert_same(_negated(make(subject, name, a, maximize=True, **hp), a), trajectory(make(subject, name, b, **hp), b,
                                                                                     STEPS))


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_maximize_equals_torch(name):
    a, b = make_params(), make_params()
    assert_same(trajectory(make("ours", name, a, maximize=True), a, STEPS),
                trajectory(make("reference", name, b, maximize=True), b, STEPS))


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", o.NAMES)
def test_a_tensor_lr_equals_the_float_lr_under_a_scheduler(name, subject):
    skip_authors(subject, name, "keeps the lr tensor itself as η0 (base_lrs aliases it): a scheduler filling it in "
                 "place moves η0 too, and the bounds no longer follow lr (off by 1e-3 from step 9)")
    lr = CASES[name].hparams[0]["lr"]
    a, b = make_params(), make_params()
    opt_t, opt_f = make(subject, name, a, lr=torch.tensor(lr)), make(subject, name, b, lr=lr)
    s_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=4, gamma=0.5)  # fills the tensor in place
    s_f = torch.optim.lr_scheduler.StepLR(opt_f, step_size=4, gamma=0.5)
    assert_same(trajectory(opt_t, a, STEPS, scheduler=s_t), trajectory(opt_f, b, STEPS, scheduler=s_f))
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)
    if subject == "ours":
        for x, y in zip(opt_t.effective_lrs(), opt_f.effective_lrs()):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


# -- torch's implementation switches -----------------------------------------------------------------------------
def _torch_flags(name) -> set[str]:
    torch_cls = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adagrad": "Adagrad", "adadelta": "Adadelta",
                 "rmsprop": "RMSprop", "adam": "Adam", "amsgrad": "Adam", "adamax": "Adamax", "nadam": "NAdam",
                 "adabound": "Adam", "amsbound": "Adam"}[name]  # the AdaBound family takes Adam's
    accepted = inspect.signature(getattr(torch.optim, torch_cls)).parameters
    return {"foreach", "fused", "capturable", "differentiable"} & set(accepted)


@pytest.mark.parametrize("name", o.NAMES)
def test_implementation_switches_are_accepted_where_torch_accepts_them(name):
    flags = _torch_flags(name)
    assert set(o.REGISTRY[name].TORCH_FLAGS) == flags
    for flag in flags:
        a, b = make_params(), make_params()
        off = None if flag in ("foreach", "fused") else False
        assert_same(trajectory(make("ours", name, a, **{flag: off}), a, 3), trajectory(make("ours", name, b), b, 3))
        with pytest.raises(ConfigError, match=rf"{flag} cannot be True \(.*impl="):
            make("ours", name, make_params(), **{flag: True})
    for flag in {"foreach", "fused", "capturable", "differentiable"} - flags:
        with pytest.raises(ConfigError, match=rf"unknown keyword {flag!r}"):
            make("ours", name, make_params(), **{flag: False})
        with pytest.raises(TypeError):  # the reference refuses it too
            make("reference", name, make_params(), **{flag: False}) if name in TORCH_NAMES else _raise_type()


def _raise_type():
    raise TypeError("the authors' AdaBound takes no implementation switches")


# -- sparse gradients --------------------------------------------------------------------------------------------
SPARSE = ["sgd", "momentum", "nesterov", "adagrad"]


def _sparse_trajectory(opt, param, steps=STEPS):
    gen, out = torch.Generator().manual_seed(5), []
    for _ in range(steps):
        rows = torch.randint(0, param.shape[0], (3,), generator=gen)
        values = torch.randn(3, param.shape[1], generator=gen, dtype=param.dtype) + 0.2 * param.detach()[rows]
        param.grad = torch.sparse_coo_tensor(rows[None], values, param.shape)  # repeated rows: uncoalesced
        opt.step()
        out.append([param.detach().clone()])
    return out


@pytest.mark.parametrize("name", o.NAMES)
def test_sparse_gradients_where_torch_takes_them(name):
    a, b = torch.randn(6, 4, dtype=torch.float64), None
    a, b = a.clone().requires_grad_(), a.clone().requires_grad_()
    if name not in SPARSE:
        with pytest.raises(ConfigError, match="sparse gradients are not supported"):
            _sparse_trajectory(make("ours", name, [a]), a)
        if name in TORCH_NAMES:
            with pytest.raises(RuntimeError, match="sparse"):
                _sparse_trajectory(make("reference", name, [b]), b)
        return
    hp = dict(maximize=True)
    assert_same(_sparse_trajectory(make("ours", name, [a], **hp), a), _sparse_trajectory(make("reference", name, [b],
                                                                                             **hp), b))
    with pytest.raises(ConfigError, match="weight_decay must be 0 with sparse gradients"):
        _sparse_trajectory(make("ours", name, [a], weight_decay=0.1), a)
