"""The CIFAR SENet-18 of the paper's transfer study, with Random Mask placed by hand.

ResNet-18's layout (3×3 stem, [2, 2, 2, 2] blocks, widths 64..512, see resnet.py) with a
squeeze-excitation block: conv1-BN-ReLU, conv2-BN, then the channels scaled by
sigmoid(fc2(relu(fc1(global average pool)))) (fc1, fc2: 1×1 convs with bias, planes → planes/16
→ planes), then the shortcut added and ReLU: kuangliu/pytorch-cifar's post-activation SE
``BasicBlock``. (That repository's ``SENet18()`` factory builds its pre-activation block
instead; the post-activation one has a BN before a ReLU for every conv, where the paper puts
its masks.)

Masks: after BN, before ReLU on conv1; after bn2 on conv2, before the excitation (a masked
output stays 0 through the scaling) and the residual add; on the projection shortcut. The
squeeze-excitation convs act on 1×1 pooled maps and are never masked. Stages as in ResNet-18
(0 = stem, 1..4 = layer1..layer4); the controls as in resnet.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import ResNet, _output_size, projection_shortcut
from .stages import _dropped, _MaskSpec, _relu_unless_fused

SE_REDUCTION = 16


class SEBlock(nn.Module):
    expansion = 1

    def __init__(self, name: str, stage: int, in_planes: int, planes: int, stride: int, in_size: int,
                 spec: _MaskSpec):
        super().__init__()
        size = _output_size(in_size, stride)
        self.conv1, self.bn1 = spec.conv_bn(f"{name}.conv1", stage, in_planes, planes, 3, stride, 1, size, "relu")
        # conv2's output goes to the excitation, not to a ReLU: a masked unit applies no activation.
        self.conv2, self.bn2 = spec.conv_bn(f"{name}.conv2", stage, planes, planes, 3, 1, 1, size)
        self.shortcut = projection_shortcut(spec, name, stage, in_planes, planes, stride, size)
        squeezed = max(1, planes // SE_REDUCTION)  # at least one channel for narrow stages
        self.fc1 = nn.Conv2d(planes, squeezed, kernel_size=1)
        self.fc2 = nn.Conv2d(squeezed, planes, kernel_size=1)
        self.drop = spec.dropout(stage)

    def forward(self, x):
        out = _relu_unless_fused(self.conv1, self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        weight = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return _dropped(self.drop, F.relu(out * weight + self.shortcut(x)))


class SENet18(ResNet):
    """The CIFAR SENet-18 (see `senet18`)."""

    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__(SEBlock, (2, 2, 2, 2), num_classes, **kwargs)


def senet18(num_classes: int = 10, **kwargs) -> SENet18:
    """The CIFAR SENet-18 (ResNet-18 with squeeze-excitation blocks); the keywords of
    rk.models.resnet18."""
    return SENet18(num_classes, **kwargs)
