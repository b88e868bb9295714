"""The CIFAR ResNets of the paper's study (kuangliu/pytorch-cifar style: 3×3 stem, no max-pool,
global average pool (4×4 on 32×32 inputs), FC → classes) with Random Mask placed by hand: after
BN, before ReLU, on the last conv of a block before the residual add, and on the 1×1
projection shortcut, in the chosen stages. A masked last conv takes the shortcut as its
residual, so in eval mode add and ReLU run in the kernel's epilogue.

- ResNet-18 (the paper's network): BasicBlock (3×3, 3×3), [2, 2, 2, 2], widths 64..512.
- ResNet-50 (a source network of the transfer study): Bottleneck (1×1, 3×3 with the stride,
  1×1 expanding 4×), [3, 4, 6, 3], output widths 256..2048; every stage's first block has a
  projection shortcut (layer1's at stride 1: 64 → 256 channels), masked with its stage.

Stages: 0 = stem (conv1), 1..4 = layer1..layer4, every conv of the stage's blocks and their
shortcuts. "shallow" = '012', "deep" = '34'. A masked conv + BN pair is one MaskedConvBN2d in
the conv's slot with nn.Identity in the BN's slot, exactly what rk.convert_model produces given
the same convs, so checkpoints move between the two. (On ResNet-50 convert_model's own
"shallow", chosen by output resolution, also takes layer3.0.conv1: its 1×1 conv runs at
layer2's resolution, before the strided 3×3. Pass it the stage's conv names to match.)

The paper's controls (keywords of every model here): ``width_multiplier`` scales the channels of
the selected stages (2 = "2× wider masked stages"), ``channels_fraction`` keeps only that
fraction of their channels and no mask ("fewer channels instead of masks", with mask_ratio 0),
``deep_dropout`` ("dropout2d:P" or "dropblock:P:BLOCK") drops on the output of every block of
stages 3 and 4 in training. Dropout modules hold no state, so the checkpoint keys do not change.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch.nn as nn
import torch.nn.functional as F

from ..nn import MaskedConvBN2d
from ..wiring import wire_input_masks
# parse_stage_ratios and STAGE_SELECTIONS are imported from here by older code.
from .stages import STAGE_SELECTIONS, _dropped, _MaskSpec, _relu_unless_fused, parse_stage_ratios  # noqa: F401

STAGE_PLANES = (64, 128, 256, 512)  # planes of layer1..layer4 before a block's expansion
STEM_WIDTH = 64


def _output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # a 3×3 conv with padding 1, or a 1×1 with padding 0


def projection_shortcut(spec: _MaskSpec, name: str, stage: int, in_planes: int, out_planes: int, stride: int,
                        out_size: int) -> nn.Sequential:
    """The block's shortcut: empty (identity) unless the shape changes, else 1×1 conv + BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    conv, bn = spec.conv_bn(f"{name}.shortcut.0", stage, in_planes, out_planes, 1, stride, 0, out_size)
    return nn.Sequential(conv, bn)


def _add_and_relu(conv: nn.Module, bn: nn.Module, out, shortcut):
    """relu(bn(conv(out)) + shortcut); one fused unit when the conv slot holds a masked one."""
    if isinstance(conv, MaskedConvBN2d) and conv.activation == "relu":
        return conv(out, residual=shortcut)  # relu(mask * BN(conv(out)) + shortcut)
    return F.relu(bn(conv(out)) + shortcut)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, name: str, stage: int, in_planes: int, planes: int, stride: int, in_size: int,
                 spec: _MaskSpec):
        super().__init__()
        size = _output_size(in_size, stride)
        # conv1 feeds a ReLU, conv2 the residual add and then a ReLU: a masked unit does both
        # in its epilogue.
        self.conv1, self.bn1 = spec.conv_bn(f"{name}.conv1", stage, in_planes, planes, 3, stride, 1, size, "relu")
        self.conv2, self.bn2 = spec.conv_bn(f"{name}.conv2", stage, planes, planes, 3, 1, 1, size, "relu")
        self.shortcut = projection_shortcut(spec, name, stage, in_planes, planes, stride, size)
        self.drop = spec.dropout(stage)

    def forward(self, x):
        out = _relu_unless_fused(self.conv1, self.bn1(self.conv1(x)))
        return _dropped(self.drop, _add_and_relu(self.conv2, self.bn2, out, self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, name: str, stage: int, in_planes: int, planes: int, stride: int, in_size: int,
                 spec: _MaskSpec):
        super().__init__()
        size = _output_size(in_size, stride)
        out_planes = self.expansion * planes
        self.conv1, self.bn1 = spec.conv_bn(f"{name}.conv1", stage, in_planes, planes, 1, 1, 0, in_size, "relu")
        self.conv2, self.bn2 = spec.conv_bn(f"{name}.conv2", stage, planes, planes, 3, stride, 1, size, "relu")
        self.conv3, self.bn3 = spec.conv_bn(f"{name}.conv3", stage, planes, out_planes, 1, 1, 0, size, "relu")
        self.shortcut = projection_shortcut(spec, name, stage, in_planes, out_planes, stride, size)
        self.drop = spec.dropout(stage)

    def forward(self, x):
        out = _relu_unless_fused(self.conv1, self.bn1(self.conv1(x)))
        out = _relu_unless_fused(self.conv2, self.bn2(self.conv2(out)))
        return _dropped(self.drop, _add_and_relu(self.conv3, self.bn3, out, self.shortcut(x)))


class ResNet(nn.Module):
    """A CIFAR ResNet of ``block``s, ``num_blocks`` per stage (see the module docstring)."""

    def __init__(
        self,
        block,
        num_blocks: Sequence[int],
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
        stem = spec.channels(0, STEM_WIDTH)
        self.conv1, self.bn1 = spec.conv_bn("conv1", 0, in_channels, stem, 3, 1, 1, input_size, "relu")
        in_planes, size = stem, input_size
        for stage, (planes, stride, count) in enumerate(zip(STAGE_PLANES, (1, 2, 2, 2), num_blocks), start=1):
            planes = spec.channels(stage, planes)
            blocks = []
            for i in range(count):
                block_stride = stride if i == 0 else 1
                blocks.append(block(f"layer{stage}.{i}", stage, in_planes, planes, block_stride, size, spec))
                in_planes, size = planes * block.expansion, _output_size(size, block_stride)
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        wire_input_masks(self)  # each block's conv2 (and the first block's conv1) skips its zero inputs

    def forward(self, x):
        out = _relu_unless_fused(self.conv1, self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # 4×4 average pool on 32×32 inputs
        return self.linear(out)


class ResNet18(ResNet):
    """The paper's CIFAR ResNet-18 (see `resnet18`)."""

    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, **kwargs)


class ResNet50(ResNet):
    """The CIFAR ResNet-50 (see `resnet50`)."""

    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, **kwargs)


def resnet18(
    num_classes: int = 10,
    *,
    mask_ratio: Union[float, Mapping[str, float]] = 0.0,
    mask_layers: str = "shallow",
    mask_mode: str = "neuron",
    group_size: Optional[int] = None,
    seed: int = 0,
    **kwargs,
) -> ResNet18:
    """The paper's CIFAR ResNet-18. ``mask_ratio`` with ``mask_layers`` ("shallow" = '012',
    "deep" = '34', "all" = '01234', or digits), or separate ratios as {"012": 0.9, "34": 0.3}.
    Further keywords: group_size, input_size (32), in_channels (3), bn_stats, backend, and the
    controls width_multiplier (1), channels_fraction (1), deep_dropout (None)."""
    return ResNet18(
        num_classes, mask_ratio=mask_ratio, mask_layers=mask_layers, mask_mode=mask_mode, group_size=group_size,
        seed=seed, **kwargs,
    )


def resnet50(num_classes: int = 10, **kwargs) -> ResNet50:
    """The CIFAR ResNet-50 (bottleneck blocks [3, 4, 6, 3]); the keywords of `resnet18`."""
    return ResNet50(num_classes, **kwargs)
