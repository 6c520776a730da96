"""A stacked population equals its members run one by one: outputs, gradients, BatchNorm running stats and the
objective models' losses, at float64, for real models built by ``optstudy.models.build`` under K seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from optstudy import models
from optstudy.data import Data
from optstudy.population.stack import NotStackable, Stacked, stack

K, B = 3, 4
DIGITS = Data(train=None, val=None, task="classification", shape=(1, 8, 8), n_classes=10)
OBJECTIVE = Data(train=None, val=None, task="objective")
# tiny widths keep the file fast; resnet18 has no width option (11M parameters), 8x8 inputs keep it affordable
CLASSIFIERS = {
    "mlp": {"hidden": [16]},
    "logreg": {},
    "cnn": {"channels": [4, 8], "hidden": 16},
    "resnet18": {},
}
FORWARD_RTOL, GRAD_RTOL = 1e-12, 1e-10


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def build(name: str, seed: int, data: Data = DIGITS, **params):
    torch.manual_seed(seed)
    return models.build(OmegaConf.create({"name": name, **params}), data)


def population(name: str, **params) -> list:
    """K members under seeds 0..K-1; a few train-mode forwards on member-specific inputs give BatchNorm members
    different running stats, so a test in eval mode can tell one member's stats from another's."""
    members = [build(name, seed, **params) for seed in range(K)]
    with torch.no_grad():
        for k, m in enumerate(members):
            m(torch.randn(B, 1, 8, 8) + k)
    return members


def images(seed: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, B, 1, 8, 8, generator=gen), torch.randint(10, (K, B), generator=gen)


def close(actual, expected, rtol):
    # atol only for entries that cancel to ~0, where a relative error means nothing
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_and_gradients_equal_each_members(name, mode):
    members = population(name, **CLASSIFIERS[name])
    stacked = stack(members)
    for module in (stacked, *members):
        module.train(mode == "train")
    x, y = images()

    out = stacked(x)  # [K, B, 10]
    F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(K, B).mean(1).sum().backward()
    for k, m in enumerate(members):
        ref = m(x[k])  # once: in train mode every forward updates BatchNorm's running stats
        close(out[k], ref, FORWARD_RTOL)
        F.cross_entropy(ref, y[k]).backward()

    names = [n for n, _ in members[0].named_parameters()]
    assert [n for n, _ in stacked.named_parameters()] == [f"model.{n}" for n in names]
    for n, p in zip(names, stacked.parameters()):
        assert p.is_contiguous() and p.shape[0] == K
        for k, m in enumerate(members):
            close(p.grad[k], m.get_parameter(n).grad, GRAD_RTOL)


def test_batchnorm_running_stats_are_per_member():
    members = population("resnet18")
    stacked = stack(members)
    for step in range(3):
        x, _ = images(seed=step)
        with torch.no_grad():
            stacked(x)
            for k, m in enumerate(members):
                m(x[k])
    buffers = dict(stacked.model.named_buffers())
    assert any("running_var" in n for n in buffers)
    for n, buf in buffers.items():
        for k, m in enumerate(members):
            close(buf[k], m.get_buffer(n), FORWARD_RTOL)
    assert not torch.equal(buffers["1.running_mean"][0], buffers["1.running_mean"][1])


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_member_returns_its_current_weights(name):
    members = population(name, **CLASSIFIERS[name])
    originals = [m.state_dict() for m in members]
    stacked = stack(members)
    with torch.no_grad():
        for t in (*stacked.parameters(), *stacked.buffers()):
            if t.is_floating_point():  # a different change for every member; variances stay positive
                t.mul_(torch.rand_like(t) + 0.5).add_(torch.rand_like(t))
    stacked.eval()
    x, _ = images()
    out = stacked(x)
    for k in range(K):
        m = stacked.member(k)
        assert type(m) is type(members[k]) and not m.training
        assert m.state_dict().keys() == originals[k].keys()
        for n, t in m.state_dict().items():
            assert torch.equal(t, stacked.model.state_dict()[n][k]), n
            if t.is_floating_point():
                assert not torch.equal(t, originals[k][n]), n
        close(m(x[k]), out[k], FORWARD_RTOL)
        with torch.no_grad():
            next(m.parameters()).zero_()  # a copy: the population keeps its weights
        assert next(stacked.parameters())[k].abs().sum() > 0
    for m, original in zip(members, originals):  # stacking copied the members' tensors too
        assert all(torch.equal(t, original[n]) for n, t in m.state_dict().items())


def test_batched_layers_equal_vmap():
    stacked = stack(population("mlp", hidden=[16, 8]))
    assert "batched layers" in repr(stacked)
    x, _ = images()
    torch.testing.assert_close(stacked._layers_forward(x), stacked._vmap_forward(x), rtol=FORWARD_RTOL, atol=0)
    assert "path=vmap" in repr(stack(population("cnn", **CLASSIFIERS["cnn"])))


def test_dropout_masks_differ_per_member():
    members = [build("cnn", 0, channels=[4], hidden=64, dropout=0.5) for _ in range(K)]  # identical members
    stacked = stack(members)
    x = images()[0][:1].expand(K, -1, -1, -1, -1)  # and identical inputs
    out = stacked(x)
    assert not torch.equal(out[0], out[1])
    stacked.eval()
    out = stacked(x)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


OBJECTIVES = {
    "counterexample": {},
    "noisy_quadratic": {"dim": 5, "noise": 0.0},  # noise-free: a member's noise is not its standalone run's
    "beale": {},
    "rosenbrock": {},
    "saddle": {},
}


def objectives(name: str) -> list:
    """K members of one objective (the same start by construction), moved to member-specific iterates."""
    members = [build(name, seed, OBJECTIVE, **OBJECTIVES[name]) for seed in range(K)]
    with torch.no_grad():
        for k, m in enumerate(members):
            for p in m.parameters():
                p.add_(0.3 * k + 0.1 * torch.arange(p.numel()).view(p.shape))
    return members


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_models_equal_each_members(name):
    members = objectives(name)
    stacked = stack(members)
    for step in range(2):  # counterexample's loss changes with the step counter t, which each member keeps
        losses = stacked(torch.zeros(K, B) if step else None)  # [K]; the objectives ignore a batch
        assert losses.shape == (K,)
        losses.sum().backward()
        for k, m in enumerate(members):
            ref = m()
            close(losses[k], ref, FORWARD_RTOL)
            ref.backward()
    assert stacked.model.t.tolist() == [2] * K
    for n, p in stacked.model.named_parameters():
        for k, m in enumerate(members):
            close(p.grad[k], m.get_parameter(n).grad, GRAD_RTOL)
    close(stacked.val_loss(), torch.stack([m.val_loss() for m in members]), FORWARD_RTOL)
    assert stacked.metrics() == [m.metrics() for m in members]
    for module in (stacked, *members):
        module.eval()
    close(stacked(), torch.stack([m() for m in members]), FORWARD_RTOL)
    assert stacked.model.t.tolist() == [2] * K  # eval mode leaves t alone


def test_objective_project_acts_per_member():
    stacked = stack(objectives("counterexample"))
    with torch.no_grad():
        stacked.model.x.copy_(torch.tensor([[-3.0], [0.5], [3.0]]))  # [K, 1]
    stacked.project_()
    assert stacked.model.x.flatten().tolist() == [-1.0, 0.5, 1.0]


def test_objective_noise_differs_per_member():
    stacked = stack([build("noisy_quadratic", 0, OBJECTIVE, dim=5) for _ in range(K)])  # identical members
    losses = stacked()
    assert len(set(losses.tolist())) == K
    close(stacked.val_loss(), stacked.val_loss()[:1].expand(K), 0)


def test_lstm_is_not_stackable():
    text = Data(train=None, val=None, task="language_model", n_classes=20)
    members = [build("lstm", seed, text, emb=4, hidden=4) for seed in range(2)]
    with pytest.raises(NotStackable, match=r"nn\.LSTM has no vmap rule"):
        stack(members)


@pytest.mark.parametrize("other, reason", [
    ({"hidden": 8}, r"shape"),  # another width
    ({"hidden": 16, "dropout": 0.5}, r"\.p is 0\.5, member 0's 0\.0"),  # same tensors, another setting
])
def test_members_must_be_alike(other, reason):
    members = [build("cnn", 0, channels=[4], hidden=16, dropout=0.0), build("cnn", 1, channels=[4], **other)]
    with pytest.raises(NotStackable, match=reason):
        stack(members)
    assert isinstance(stack(members[:1]), Stacked)  # one member is a population too


def test_keep_members_cuts_every_tensor_in_place_unless_something_holds_a_weak_reference():
    import weakref

    members = population("cnn")
    stacked = stack(members)
    params = list(stacked.parameters())
    assert stacked.can_keep_members()
    stacked.keep_members([0, 2])
    assert list(stacked.parameters()) == params and all(p.shape[0] == 2 for p in params)  # the same objects
    for kept, k in ((0, 0), (1, 2)):
        for p, q in zip(stacked.member(kept).parameters(), members[k].parameters(), strict=True):
            assert torch.equal(p, q)
    ref = weakref.ref(params[0])  # as a compiler's guard would hold: swap_tensors would refuse, so no cut at all
    assert not stacked.can_keep_members() and ref() is params[0]
