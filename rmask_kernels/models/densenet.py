"""The CIFAR DenseNet-121 of the paper's transfer study (kuangliu/pytorch-cifar's: growth 32,
dense blocks [6, 12, 24, 16], reduction 0.5, a bare 3×3 stem conv of 64 channels, no max-pool),
with Random Mask placed by hand.

A dense layer is BN-ReLU-conv1x1 (4·growth) - BN-ReLU-conv3x3 (growth), its output concatenated
in front of its input; a transition is BN-ReLU-conv1x1-avgpool2; the head BN-ReLU, global
average pool, FC. Stages: 0 = the stem conv; 1..4 = dense block 1..4, each with the transition
after it (transitions 1..3 run at their block's resolution). "shallow" = '012' (the convs at
32×32 and 16×16 on CIFAR), "deep" = '34'.

Where the masks go. The paper (which uses DenseNet-121 only as an unmasked source network of
its transfer attacks) masks after BN, before ReLU. In this pre-activation network only one conv
per dense layer has a BN of its own after it: the 1×1 bottleneck conv (conv1, with bn2); it
becomes a MaskedConvBN2d with its ReLU, the paper's placement. Every other conv of a selected
stage (the stem, each layer's 3×3 growth conv, the transitions' convs) feeds a concatenation or a
pool that several BNs read: it becomes a MaskedConv2d, the mask on the conv's output. Its masked
neurons are 0 in the concatenation and a per-channel constant after each reader's BN: they
carry nothing of the input, as in the paper, but are not 0 after that BN-ReLU. This is what
rk.convert_model does with the same convs, so checkpoints move between the two.

The controls: ``width_multiplier`` / ``channels_fraction`` scale the growth rate of the selected
dense blocks (and the stem's width for stage 0); transitions halve whatever they receive, as
always. ``deep_dropout`` drops on each dense layer's new features in blocks 3 and 4 (before the
concatenation) in training.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stages import _dropped, _MaskSpec, _relu_unless_fused

GROWTH_RATE = 32
BLOCKS = (6, 12, 24, 16)
REDUCTION = 0.5


class DenseLayer(nn.Module):
    """kuangliu's ``Bottleneck``: BN-ReLU-conv1x1-BN-ReLU-conv3x3, output cat([new, input])."""

    def __init__(self, name: str, stage: int, in_planes: int, growth: int, size: int, spec: _MaskSpec):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1, self.bn2 = spec.conv_bn(f"{name}.conv1", stage, in_planes, 4 * growth, 1, 1, 0, size, "relu")
        self.conv2 = spec.conv(f"{name}.conv2", stage, 4 * growth, growth, 3, 1, 1, size)
        self.drop = spec.dropout(stage)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(_relu_unless_fused(self.conv1, self.bn2(out)))
        return torch.cat([_dropped(self.drop, out), x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1, then a 2×2 average pool."""

    def __init__(self, name: str, stage: int, in_planes: int, out_planes: int, size: int, spec: _MaskSpec):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = spec.conv(f"{name}.conv", stage, in_planes, out_planes, 1, 1, 0, size)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet121(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        *,
        mask_ratio: Union[float, Mapping[str, float]] = 0.0,
        mask_layers: str = "shallow",
        mask_mode: str = "neuron",
        group_size: Optional[int] = None,
        seed: int = 0,
        input_size: int = 32,
        in_channels: int = 3,
        bn_stats: str = "all",
        backend: str = "auto",
        width_multiplier: float = 1.0,
        channels_fraction: float = 1.0,
        deep_dropout: Optional[str] = None,
    ):
        super().__init__()
        spec = _MaskSpec.for_stages(
            mask_ratio=mask_ratio, mask_layers=mask_layers, mask_mode=mask_mode, group_size=group_size, seed=seed,
            bn_stats=bn_stats, backend=backend, width_multiplier=width_multiplier,
            channels_fraction=channels_fraction, deep_dropout=deep_dropout,
        )
        self.stage_ratios, self.mask_mode = spec.stage_ratios, spec.mode
        planes, size = spec.channels(0, 2 * GROWTH_RATE), input_size
        self.conv1 = spec.conv("conv1", 0, in_channels, planes, 3, 1, 1, size)
        for stage, count in enumerate(BLOCKS, start=1):
            growth = spec.channels(stage, GROWTH_RATE)
            layers = []
            for i in range(count):
                layers.append(DenseLayer(f"dense{stage}.{i}", stage, planes, growth, size, spec))
                planes += growth
            setattr(self, f"dense{stage}", nn.Sequential(*layers))
            if stage < len(BLOCKS):
                out_planes = int(math.floor(planes * REDUCTION))
                setattr(self, f"trans{stage}", Transition(f"trans{stage}", stage, planes, out_planes, size, spec))
                planes, size = out_planes, size // 2
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = self.dense4(out)
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)  # 4×4 average pool on 32×32 inputs
        return self.linear(out)


def densenet121(num_classes: int = 10, **kwargs) -> DenseNet121:
    """The CIFAR DenseNet-121 (growth 32, blocks [6, 12, 24, 16]); the keywords of
    rk.models.resnet18 (see the module docstring for where the masks go)."""
    return DenseNet121(num_classes, **kwargs)
