"""The Adam and AdaBound experiments' models: output shapes on CIFAR-like and digits-like inputs, the parameter
counts of the reference code, gradients reaching every parameter, config errors, and the config files."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from optstudy import models
from optstudy.data import Data
from optstudy.errors import ConfigError
from optstudy.models import _lm, _vision

CONF = Path(__file__).resolve().parents[2] / "conf"
VISION = ("cnn", "resnet18", "resnet34", "densenet121")
VOCAB, BATCH, BPTT = 50, 2, 7


def image_data(shape=(3, 32, 32), n_classes=10) -> Data:
    return Data(train=None, val=None, task="classification", shape=shape, n_classes=n_classes)


def text_data() -> Data:
    return Data(train=None, val=None, task="language_model", n_classes=VOCAB)


def tokens() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, BPTT), generator=torch.Generator().manual_seed(0))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_all_grads(model, out):
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name


# the counts of kuangliu/pytorch-cifar's ResNet18/ResNet34/DenseNet121 and of Adam's c64-c64-c128-1000 CNN
@pytest.mark.parametrize("name, count", [("cnn", 2_371_266), ("resnet18", 11_173_962), ("resnet34", 21_282_122),
                                         ("densenet121", 6_956_298)])
def test_vision_on_cifar10(name, count):
    model = _vision.MODELS[name][1](image_data())
    assert n_params(model) == count
    with torch.no_grad():  # gradients are tested on the cheaper 8x8 inputs below
        assert model(torch.randn(BATCH, 3, 32, 32)).shape == (BATCH, 10)


@pytest.mark.parametrize("name", VISION)
def test_vision_on_digits_reaches_every_parameter(name):
    # 8x8 inputs take every pooling stage down to 1x1 and keep the backward pass of the big models fast
    model = _vision.MODELS[name][1](image_data((1, 8, 8), n_classes=7))
    out = model(torch.randn(BATCH, 1, 8, 8))
    assert out.shape == (BATCH, 7)
    assert_all_grads(model, out)


def test_cnn_options():
    model = _vision.cnn(image_data((1, 8, 8)), channels=[4, 8], hidden=16, dropout=0.5)
    assert model(torch.randn(BATCH, 1, 8, 8)).shape == (BATCH, 10)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model)


def test_densenet_transition_pools_like_avg_pool2d_on_even_sizes():
    transition = _vision.Transition(4, 2)
    x = torch.randn(BATCH, 4, 6, 6)
    assert torch.equal(transition(x), F.avg_pool2d(transition.layers(x), 2))
    assert transition(torch.randn(BATCH, 4, 1, 1)).shape == (BATCH, 2, 1, 1)


@pytest.mark.parametrize("layers", (1, 2, 3))
def test_lstm_output_shape_and_gradients(layers):
    model = _lm.lstm(text_data(), emb=8, hidden=12, layers=layers)
    out = model(tokens())
    assert out.shape == (BATCH, BPTT, VOCAB)
    assert model.rnn.num_layers == layers
    assert_all_grads(model, out)


def test_lstm_is_causal_and_starts_from_zero_state():
    model = _lm.lstm(text_data(), emb=8, hidden=8, layers=2).eval()
    x = tokens()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    out = model(x)
    # a later token cannot change earlier logits, and nothing carries over between calls
    assert torch.equal(model(changed)[:, :-1], out[:, :-1])
    assert torch.equal(model(x), out)


def test_lstm_init_and_tied_weights():
    model = _lm.lstm(text_data(), emb=16, hidden=16, tie_weights=True)
    assert model.decoder.weight is model.encoder.weight
    assert model.encoder.weight.abs().max() <= 0.1 and not model.decoder.bias.any()
    assert_all_grads(model, model(tokens()))


@pytest.mark.parametrize("layers", (0, 4))
def test_lstm_layers_out_of_range(layers):
    with pytest.raises(ConfigError, match="model.layers"):
        _lm.lstm(text_data(), layers=layers)


def test_lstm_tie_weights_needs_equal_sizes():
    with pytest.raises(ConfigError, match="model.tie_weights"):
        _lm.lstm(text_data(), emb=8, hidden=16, tie_weights=True)


@pytest.mark.parametrize("name", VISION + ("lstm",))
def test_config_file_matches_factory(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    data = text_data() if name == "lstm" else image_data((1, 8, 8))
    assert isinstance(models.build(cfg.model, data), torch.nn.Module)
    # the file lists every parameter of the factory with its default
    factory = {**_vision.MODELS, **_lm.MODELS}[name][1]
    defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items() if k != "data"}
    given = OmegaConf.to_container(cfg.model)
    assert given.pop("name") == name
    assert given == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


def test_lstm_layers_override():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=lstm", "model.layers=3"])
    assert models.build(cfg.model, text_data()).rnn.num_layers == 3
