"""``model.batch_norm`` and ``model.init`` for ``mlp`` and ``cnn``: off, the models are today's (same modules, same
initial draws); on, a BatchNorm before each hidden ReLU, and a population's members keep their own BatchNorm
statistics while they train, equal to their standalone runs' at float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from optstudy import models
from optstudy import optim as o
from optstudy.config import compose, validate
from optstudy.data import Data
from optstudy.errors import ConfigError
from optstudy.population.stack import stack

DIGITS = Data(train=None, val=None, task="classification", shape=(1, 8, 8), n_classes=10)
SMALL = {"mlp": {"hidden": [16, 12]}, "cnn": {"channels": [4, 8], "hidden": 16}}
K, B = 3, 8


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def build(name, seed=0, **params):
    torch.manual_seed(seed)
    return models.build(OmegaConf.create({"name": name, **SMALL[name], **params}), DIGITS)


def todays_mlp(hidden):
    """The mlp as it was before the option (the module list of ``_dense.mlp`` before batch_norm)."""
    layers, width = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_off_the_mlp_is_todays():
    torch.manual_seed(3)
    today = todays_mlp([16, 12])
    ours = build("mlp", seed=3, batch_norm=False, init="default")
    assert repr(ours) == repr(today) and same_tensors(ours, today)
    after_ours = torch.randn(3)  # the global RNG drew no more for the options: the batches that follow are today's
    torch.manual_seed(3)
    todays_mlp([16, 12])
    assert torch.equal(after_ours, torch.randn(3))


@pytest.mark.parametrize("name", SMALL)
def test_on_a_batch_norm_before_each_hidden_relu_and_the_same_weights(name):
    plain, bn = build(name, seed=1), build(name, seed=1, batch_norm=True)
    kinds = [type(m) for m in bn.modules()]
    norms = [m for m in bn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # one per hidden Linear (mlp) / per conv and the hidden Linear (cnn)
    assert len(norms) == (2 if name == "mlp" else 3)
    for i, kind in enumerate(kinds):
        if issubclass(kind, nn.modules.batchnorm._BatchNorm):
            assert kinds[i + 1] is nn.ReLU
    # BatchNorm draws nothing: the Linear and Conv weights are the draws of the model without it (a paired comparison)
    weights = [(n, p) for n, p in plain.named_parameters()]
    bn_weights = [p for m in bn.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()]
    assert len(weights) == len(bn_weights)
    assert all(torch.equal(p, q) for (_, p), q in zip(weights, bn_weights))


def test_batch_norm_normalises_each_hidden_pre_activation_in_train_mode():
    """In train mode a BatchNorm output has per-feature batch mean 0 and (biased) variance 1 (γ=1, β=0 at start)."""
    model = build("mlp", batch_norm=True)
    seen = []
    model[2].register_forward_hook(lambda m, i, out: seen.append(out))
    model(torch.randn(64, 1, 8, 8))
    out = seen[0]
    torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)  # eps = 1e-5


@pytest.mark.parametrize("name", SMALL)
def test_inits(name):
    zero, normal = build(name, init="zero", batch_norm=True), build(name, init="normal", init_std=0.1)
    for m in zero.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert not m.weight.any() and not m.bias.any()
        if isinstance(m, nn.BatchNorm1d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))  # BatchNorm keeps its 1 and 0
    weights = torch.cat([m.weight.flatten() for m in normal.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    assert weights.std().item() == pytest.approx(0.1, rel=0.1)  # n > 1000 draws: relative s.e. ~2%
    assert all(not m.bias.any() for m in normal.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_the_deep_mlp_of_the_gradient_noise_paper():
    """20 hidden layers of 50 units (Neelakantan et al. 2015)."""
    model = build("mlp", hidden=[50] * 20, init="normal")
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 21
    assert sum(p.numel() for p in model.parameters()) == 64 * 50 + 50 + 19 * (50 * 50 + 50) + 50 * 10 + 10


@pytest.mark.parametrize("override, message", [
    ("model.batch_norm=maybe", "model.batch_norm must be true or false, got 'maybe'"),
    ("model.init=xavier", "model.init must be one of default, normal, zero, got 'xavier'"),
    ("model.init_std=0", "model.init_std must be a number > 0, got 0"),
])
def test_bad_values_are_config_errors_before_the_data_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["model=mlp", override]))


# -- populations ------------------------------------------------------------------------------------------------------
def train_steps(model, opt, xs, ys, stacked: bool):
    """SGD steps on member-specific batches: ``xs[t]`` is ``[K, B, 1, 8, 8]``."""
    for x, y in zip(xs, ys):
        opt.zero_grad()
        if stacked:
            out = model(x)  # [K, B, 10]
            loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(K, B).mean(1).sum()
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", SMALL)
def test_a_members_batch_norm_statistics_are_its_standalone_runs(name):
    """K members trained as one stack (momentum SGD, members=K, per-member lr) and each alone on its own batches:
    after 5 steps every BatchNorm's running mean and variance, and every parameter, of member k equal its standalone
    run's at float64 (rtol 1e-10: the stacked forward sums in another order)."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(K, B, 1, 8, 8, generator=gen) + torch.arange(K).view(K, 1, 1, 1, 1) for _ in range(5)]
    ys = [torch.randint(10, (K, B), generator=gen) for _ in range(5)]
    lrs = [0.05, 0.1, 0.2]
    members = [build(name, seed=k, batch_norm=True) for k in range(K)]
    stacked = stack(members)
    stacked.train()
    train_steps(stacked, o.build("momentum", stacked.parameters(), members=K, lr=lrs), xs, ys, stacked=True)
    for k, m in enumerate(members):
        m.train()
        train_steps(m, o.build("momentum", m.parameters(), lr=lrs[k]), [x[k] for x in xs], [y[k] for y in ys], False)
    stats = {n: b for n, b in stacked.model.named_buffers() if "running" in n}
    assert len(stats) == 2 * (2 if name == "mlp" else 3)
    for n, buf in stats.items():
        for k, m in enumerate(members):
            torch.testing.assert_close(buf[k], m.get_buffer(n), rtol=1e-10, atol=1e-12, msg=f"member {k} {n}")
    for n, p in stacked.model.named_parameters():
        for k, m in enumerate(members):
            torch.testing.assert_close(p[k], m.get_parameter(n), rtol=1e-10, atol=1e-12)
    first = next(iter(stats.values()))
    assert not torch.allclose(first[0], first[1])  # the members' statistics differ
    assert math.isfinite(first.sum().item())


def test_a_trained_population_members_batch_norm_run_equals_its_standalone_run():
    """Through ``train.py``'s population (Lightning, vmap over the BN MLP): each member's val_loss, computed in eval
    mode with its own running statistics, equals its standalone run's at float64 (rel 1e-9), and the members differ."""
    from mlflow import MlflowClient

    from optstudy.population.members import member_configs
    from optstudy.population.run import train_population
    from optstudy.train import train

    overrides = ["model=mlp", "model.batch_norm=true", "optimizer=momentum", "optimizer.lr=0.05",
                 "population.seed=[0,1]", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                 "trainer.precision=64-true", "checkpoint.enabled=false"]
    result = train_population(compose(overrides))
    configs, _ = member_configs(compose(overrides))
    assert result.members[0].value != result.members[1].value
    for member, cfg in zip(result.members, configs):
        alone = train(cfg)
        expected = MlflowClient(alone.tracking_uri).get_run(alone.run_id).data.metrics["val_loss"]
        assert member.value == pytest.approx(expected, rel=1e-9, abs=0)
