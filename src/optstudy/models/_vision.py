"""Convolutional image classifiers of the Adam and AdaBound papers' experiments.

- ``cnn``: the small CNN of Adam's CIFAR-10 experiment (Kingma & Ba 2015, section 6.3);
- ``resnet18``, ``resnet34``, ``densenet121``: the CIFAR-style networks AdaBound's CIFAR-10 experiment trains
  (Luo et al. 2019, section 5), which come from kuangliu/pytorch-cifar.

All take their input channels from ``data.shape[0]`` and run on any image size down to 8x8 digits: where the original
pools to a fixed size (``avg_pool2d(out, 4)`` after 32x32 inputs) we pool adaptively to 1x1, which is the same on
32x32 CIFAR images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from optstudy.models._norm import check_options, initialise

# --- Adam's CNN ---------------------------------------------------------------------------------------------------


def cnn(data, channels=(64, 64, 128), hidden=1000, dropout=0.0, batch_norm=False, init="default",
        init_std=0.1) -> nn.Module:
    """Adam's CIFAR-10 CNN (Kingma & Ba 2015, section 6.3): "c64-c64-c128-1000".

    Each stage is a 5x5 convolution (padding 2, size kept), ReLU and a 3x3 max-pool of stride 2; then a fully
    connected hidden layer of ``hidden`` units with ReLU and ``dropout``, then the output layer. The paper does not
    give the pooling's padding; padding 1 halves the size rounding up (32 -> 16 -> 8 -> 4) and works on any size. The
    pool is skipped once the image is 1x1, where it could only be the identity (8x8 digits: 8 -> 4 -> 2 -> 1).

    ``batch_norm=True`` (not in the paper) puts a BatchNorm after each convolution and after the hidden layer, before
    its ReLU (Ioffe & Szegedy 2015); the other layers and their initial draws are unchanged. ``init``, ``init_std``:
    as for ``mlp`` (``optstudy.models._norm``).
    """
    check_options(batch_norm, init, init_std)
    layers, width, (h, w) = [], data.shape[0], data.shape[1:]
    for c in channels:
        layers += [nn.Conv2d(width, c, 5, padding=2), *([nn.BatchNorm2d(c)] if batch_norm else []), nn.ReLU()]
        if (h, w) != (1, 1):
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        width = c
    model = nn.Sequential(*layers, nn.Flatten(),
                          nn.Linear(width * h * w, hidden), *([nn.BatchNorm1d(hidden)] if batch_norm else []),
                          nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, data.n_classes))
    return initialise(model, init, init_std)


# --- CIFAR ResNets ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN, plus the input, then ReLU.

    When the block changes the size or the width, the shortcut is a strided 1x1 conv with BN ("option B").
    """

    def __init__(self, width_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(nn.Conv2d(width_in, width, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _resnet(data, blocks) -> nn.Module:
    """The CIFAR ResNet of kuangliu/pytorch-cifar that AdaBound trains (Luo et al. 2019).

    Unlike ImageNet ResNets the stem is one 3x3 conv of stride 1 without max-pool, so 32x32 images keep their size
    until the stride-2 stages: 32 -> 32 -> 16 -> 8 -> 4, then global average pool and a linear layer.
    """
    layers, width_in = [nn.Conv2d(data.shape[0], 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for i in range(n):
            # only a stage's first block downsamples, and the first stage not at all
            layers.append(BasicBlock(width_in, width, stride=2 if stage > 0 and i == 0 else 1))
            width_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width_in, data.n_classes))


def resnet18(data) -> nn.Module:
    """CIFAR ResNet-18: BasicBlock stages [2, 2, 2, 2]; 11,173,962 parameters for CIFAR-10."""
    return _resnet(data, (2, 2, 2, 2))


def resnet34(data) -> nn.Module:
    """CIFAR ResNet-34: BasicBlock stages [3, 4, 6, 3]; 21,282,122 parameters for CIFAR-10."""
    return _resnet(data, (3, 4, 6, 3))


# --- CIFAR DenseNet -----------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """DenseNet-B layer (Huang et al. 2017): BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), its k maps joined to its input."""

    def __init__(self, width_in: int, growth: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(width_in), nn.ReLU(), nn.Conv2d(width_in, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        # new maps first, as kuangliu/pytorch-cifar concatenates them
        return torch.cat([self.layers(x), x], dim=1)


class Transition(nn.Module):
    """DenseNet-C transition: BN-ReLU-conv1x1 to the compressed width, then 2x2 average pool.

    The pool is adaptive to half the size rounded up: on even sizes exactly ``avg_pool2d(out, 2)``, and on 1x1 maps
    (8x8 digits reach them at the third transition) the identity instead of an error.
    """

    def __init__(self, width_in: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.BatchNorm2d(width_in), nn.ReLU(), nn.Conv2d(width_in, width, 1, bias=False))

    def forward(self, x):
        out = self.layers(x)
        return F.adaptive_avg_pool2d(out, [math.ceil(s / 2) for s in out.shape[-2:]])


def densenet121(data) -> nn.Module:
    """The CIFAR DenseNet-121 of kuangliu/pytorch-cifar that AdaBound trains (Luo et al. 2019; Huang et al. 2017).

    A 3x3 stem conv to 2k maps (no 7x7 conv or max-pool, for 32x32 images); four dense blocks of [6, 12, 24, 16]
    Bottleneck layers, each adding k = 32 maps; between blocks a transition that halves the width (compression 0.5)
    and the size; then BN-ReLU, global average pool and a linear layer. 6,956,298 parameters for CIFAR-10.
    """
    growth = 32
    width = 2 * growth
    layers = [nn.Conv2d(data.shape[0], width, 3, padding=1, bias=False)]
    for b, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            layers.append(Bottleneck(width, growth))
            width += growth
        if b < 3:  # no transition after the last block
            layers.append(Transition(width, width // 2))
            width //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, data.n_classes))


MODELS = {
    "cnn": ("classification", cnn),
    "resnet18": ("classification", resnet18),
    "resnet34": ("classification", resnet34),
    "densenet121": ("classification", densenet121),
}
