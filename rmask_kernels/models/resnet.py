"""The paper's CIFAR ResNet-18 (3×3 stem, no max-pool, average pool, FC 512 → classes) with
Random Mask placed by hand: after BN, before ReLU, on the second conv of a block before the
residual add, and on the 1×1 projection shortcut, in the chosen stages. A masked second conv
takes the shortcut as its residual, so in eval mode add and ReLU run in the kernel's epilogue.

Stages: 0 = stem, 1..4 = layer1..layer4. A masked conv + BN pair is one MaskedConvBN2d in
the conv's slot with nn.Identity in the BN's slot, exactly what rk.convert_model produces, so
checkpoints move between the two.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch.nn as nn
import torch.nn.functional as F

from ..masks import check_mode, check_ratio, layer_seed
from ..nn import MaskedConvBN2d

STAGE_SELECTIONS = {"shallow": "012", "deep": "34", "all": "01234"}


def parse_stage_ratios(mask_ratio, mask_layers) -> Dict[int, float]:
    """{stage: ratio} from a ratio and a selection ("shallow" = '012', "deep" = '34', "all",
    or digits), or from a mapping {"012": 0.9, "34": 0.3} giving separate ratios."""
    if isinstance(mask_ratio, Mapping):
        ratios: Dict[int, float] = {}
        for stages, ratio in mask_ratio.items():
            for stage in _parse_stages(stages):
                if stage in ratios:
                    raise ValueError(f"mask_ratio names stage {stage} twice: {dict(mask_ratio)}")
                ratios[stage] = check_ratio(ratio, f"mask_ratio[{stages!r}]")
        return ratios
    ratio = check_ratio(mask_ratio, "mask_ratio")
    return {stage: ratio for stage in _parse_stages(mask_layers)} if ratio > 0 else {}


def _parse_stages(selection) -> list:
    digits = STAGE_SELECTIONS.get(selection, selection)
    if not isinstance(digits, str) or not digits or any(c not in "01234" for c in digits):
        raise ValueError(
            f"mask_layers must be 'shallow', 'deep', 'all' or stage digits from '01234' (0 = stem), got {selection!r}"
        )
    return sorted(set(int(c) for c in digits))


class _MaskSpec:
    """How to build the conv+BN pairs of one model."""

    def __init__(self, stage_ratios, mode, group_size, seed, bn_stats, backend):
        self.stage_ratios, self.mode, self.group_size = stage_ratios, mode, group_size
        self.seed, self.bn_stats, self.backend = seed, bn_stats, backend

    def conv_bn(self, name, stage, in_ch, out_ch, kernel, stride, padding, out_size, activation=None):
        ratio = self.stage_ratios.get(stage, 0.0)
        if ratio == 0.0:
            return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False), nn.BatchNorm2d(out_ch)
        unit = MaskedConvBN2d(
            in_ch, out_ch, kernel, stride, padding, bias=False, mask_ratio=ratio, mask_mode=self.mode,
            group_size=self.group_size, seed=layer_seed(self.seed, name), output_size=(out_size, out_size),
            bn_stats=self.bn_stats, backend=self.backend, activation=activation,
        )
        return unit, nn.Identity()


def _relu_unless_fused(conv: nn.Module, out):
    """ReLU, unless the conv slot holds a unit that already applied it in its epilogue."""
    return out if isinstance(conv, MaskedConvBN2d) and conv.activation == "relu" else F.relu(out)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, name: str, stage: int, in_planes: int, planes: int, stride: int, out_size: int, spec: _MaskSpec):
        super().__init__()
        # conv1 feeds a ReLU, conv2 the residual add and then a ReLU: a masked unit does both
        # in its epilogue.
        self.conv1, self.bn1 = spec.conv_bn(f"{name}.conv1", stage, in_planes, planes, 3, stride, 1, out_size, "relu")
        self.conv2, self.bn2 = spec.conv_bn(f"{name}.conv2", stage, planes, planes, 3, 1, 1, out_size, "relu")
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            conv, bn = spec.conv_bn(f"{name}.shortcut.0", stage, in_planes, planes, 1, stride, 0, out_size)
            self.shortcut = nn.Sequential(conv, bn)

    def forward(self, x):
        out = _relu_unless_fused(self.conv1, self.bn1(self.conv1(x)))
        if isinstance(self.conv2, MaskedConvBN2d) and self.conv2.activation == "relu":
            return self.conv2(out, residual=self.shortcut(x))  # relu(mask * BN(conv2(out)) + shortcut), one unit
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
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
    ):
        super().__init__()
        self.stage_ratios = parse_stage_ratios(mask_ratio, mask_layers)
        self.mask_mode = check_mode(mask_mode, group_size, name="mask_mode")
        spec = _MaskSpec(self.stage_ratios, self.mask_mode, group_size, seed, bn_stats, backend)
        self.conv1, self.bn1 = spec.conv_bn("conv1", 0, in_channels, 64, 3, 1, 1, input_size, "relu")
        in_planes, size = 64, input_size
        for stage, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            size = (size - 1) // stride + 1
            blocks = [
                BasicBlock(f"layer{stage}.{i}", stage, in_planes if i == 0 else planes, planes, stride if i == 0 else 1,
                           size, spec)
                for i in range(2)
            ]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = _relu_unless_fused(self.conv1, self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # 4×4 average pool on 32×32 inputs
        return self.linear(out)


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
    Further keywords: group_size, input_size (32), in_channels (3), bn_stats, backend."""
    return ResNet18(
        num_classes, mask_ratio=mask_ratio, mask_layers=mask_layers, mask_mode=mask_mode, group_size=group_size,
        seed=seed, **kwargs,
    )
