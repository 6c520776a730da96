"""Bad hyperparameters raise ``ConfigError`` naming the keyword, the rule and the value."""

from __future__ import annotations

import pytest
import torch

import optstudy.optim as o
from optstudy.errors import ConfigError, OptstudyError
from tests.optim.cases import CASES, make_params


def _raises(match, name, **hp):
    with pytest.raises(ConfigError, match=match) as info:
        o.build(name, make_params(), **hp)
    assert isinstance(info.value, OptstudyError) and isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("name", o.NAMES)
def test_negative_lr(name):
    msg = _raises(r"lr must be a number >= 0, got -0\.1", name, lr=-0.1)
    assert name in msg


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.has_betas])
@pytest.mark.parametrize("betas,index,value", [((1.0, 0.999), 0, "1.0"), ((0.9, -0.1), 1, "-0.1"),
                                                ((0.9, 1.5), 1, "1.5")])
def test_betas_outside_unit_interval(name, betas, index, value):
    _raises(rf"betas\[{index}\] must be in \[0, 1\), got {value}", name, betas=betas)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.has_betas])
def test_betas_not_a_pair(name):
    _raises(r"betas must be a pair", name, betas=0.9)


@pytest.mark.parametrize("name", o.NAMES)
def test_unknown_keyword_lists_the_valid_ones(name):
    msg = _raises(r"unknown keyword 'betas2'; valid keywords: .*lr", name, betas2=0.9)
    for key in o.defaults(name):
        assert key in msg


@pytest.mark.parametrize("name", o.NAMES)
def test_nan_is_rejected(name):
    _raises(r"lr must be a number >= 0, got nan", name, lr=float("nan"))


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ConfigError) as info:
        o.build("adm", [torch.zeros(1, requires_grad=True)])
    msg = str(info.value)
    assert "'adm'" in msg and "did you mean 'adam'" in msg
    assert all(n in msg for n in o.NAMES)


@pytest.mark.parametrize("name,hp,match", [
    ("momentum", dict(momentum=1.2), r"momentum must be in \[0, 1\), got 1\.2"),
    ("momentum", dict(dampening=2), r"dampening must be in \[0, 1\], got 2"),
    ("nesterov", dict(dampening=0.1), r"dampening must be 0 with Nesterov momentum, got 0\.1"),
    ("nesterov", dict(momentum=0.0), r"momentum must be > 0 with Nesterov, got 0\.0"),
    ("adam", dict(eps=-1e-8), r"eps must be a number >= 0, got -1e-08"),
    ("adam", dict(weight_decay=-1), r"weight_decay must be a number >= 0, got -1"),
    ("adam", dict(decoupled_weight_decay="yes"), r"decoupled_weight_decay must be true or false, got 'yes'"),
    ("rmsprop", dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1\.5"),
    ("adadelta", dict(rho=-0.5), r"rho must be in \[0, 1\], got -0\.5"),
    ("adagrad", dict(lr_decay=-1.0), r"lr_decay must be a number >= 0, got -1\.0"),
    ("nadam", dict(momentum_decay=-1.0), r"momentum_decay must be a number >= 0, got -1\.0"),
    ("adabound", dict(gamma=0.0), r"gamma must be a number > 0 .*, got 0\.0"),
    ("adabound", dict(lr=0.0), r"lr must be > 0 when the optimizer is built .*, got 0\.0"),
    ("amsbound", dict(final_lr=-0.1), r"final_lr must be a number >= 0, got -0\.1"),
    ("adabound", dict(bound="cosine"), r"unknown schedule 'cosine'; valid names: hyperbolic, paper, exponential"),
    ("adabound", dict(bound={"name": "linear", "speed": 3}), r"bound linear: unknown parameter 'speed'.*horizon"),
    ("adabound", dict(bound={"name": "exponential", "rate": -1}), r"bound exponential: rate must be a number > 0"),
    ("adam", dict(impl="fast"), r"impl must be one of auto, loop, compiled, got 'fast'"),
])
def test_rule_violations(name, hp, match):
    _raises(match, name, **hp)


def test_groups_are_validated_too_including_ones_added_later():
    params = make_params()
    with pytest.raises(ConfigError, match=r"lr must be a number >= 0, got -1"):
        o.build("adam", [{"params": params[:2]}, {"params": params[2:], "lr": -1}])
    opt = o.build("adabound", params[:2])
    with pytest.raises(ConfigError, match=r"betas\[0\] must be in \[0, 1\), got 2"):
        opt.add_param_group({"params": params[2:], "betas": (2, 0.9)})
    with pytest.raises(ConfigError, match=r"unknown keyword 'momentum' in a param group"):
        opt.add_param_group({"params": params[2:], "momentum": 0.9})


def test_flags_fixed_by_the_name_take_their_fixed_value_only():
    """``type(opt)(params, **opt.defaults)`` passes them back (see test_torch_compat); another value names the
    optimizer that has it."""
    _raises(r"amsgrad is fixed to False by the name 'adam'; use 'amsgrad', got True", "adam", amsgrad=True)
    _raises(r"nesterov is fixed to False by the name 'momentum'; use 'nesterov', got True", "momentum", nesterov=True)
    _raises(r"momentum is fixed to 0.0 by the name 'sgd'; use 'momentum' or 'nesterov', got 0.9", "sgd", momentum=0.9)
    assert o.build("adam", make_params(), amsgrad=False).param_groups[0]["amsgrad"] is False


@pytest.mark.parametrize("name,hp", [("adam", dict(lr=-1)), ("nesterov", dict(momentum=0)), ("adam", dict(lrr=1)),
                                     ("adabound", dict(lr=0)), ("sgd", dict(momentum=0.9)), ("adma", {})])
def test_check_raises_what_build_raises_without_parameters(name, hp):
    with pytest.raises(ConfigError) as built:
        o.build(name, make_params(), **hp)
    with pytest.raises(ConfigError) as checked:
        o.check(name, **hp)
    assert str(checked.value) == str(built.value)
    o.check(name if name != "adma" else "adam")  # the defaults pass


def test_a_subclass_made_elsewhere_does_not_repeat_a_name_in_the_message():
    """A user's (or another test's) subclass keeps its parent's name and kernel; the full suite once said
    "use 'momentum' or 'momentum' or 'momentum' or 'momentum' or 'nesterov'"."""
    type("MyMomentum", (o.REGISTRY["momentum"],), {})
    _raises(r"momentum is fixed to 0.0 by the name 'sgd'; use 'momentum' or 'nesterov', got 0.9", "sgd", momentum=0.9)
