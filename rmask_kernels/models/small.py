"""A small CNN for digits / MNIST (the demo's SmallCNN, any input size and channel count) with
Random Mask placed by hand on its shallow convs.

Four 3×3 conv + BN + ReLU layers (width, width, 2·width with stride 2, 2·width), global
average pool, FC. "shallow" = conv1 and conv2 (full resolution), what rk.convert_model selects
on the unmasked network; "deep" = conv3 and conv4; "all". A masked pair is a MaskedConvBN2d in
the conv's slot and nn.Identity in the BN's slot, as in rk.models.resnet18, so checkpoints move
between this and rk.convert_model(SmallCNN(mask_ratio=0), ...) with the same seed.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from ..masks import check_mode, check_ratio
from ..wiring import wire_input_masks
# One construction path for every hand-placed model: same layer seeds, same fused units.
from .stages import _MaskSpec, _relu_unless_fused

SMALL_SELECTIONS = {"shallow": (1, 2), "deep": (3, 4), "all": (1, 2, 3, 4)}


class SmallCNN(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        *,
        width: int = 32,
        mask_ratio: float = 0.0,
        mask_layers: str = "shallow",
        mask_mode: str = "neuron",
        group_size: Optional[int] = None,
        seed: int = 0,
        input_size: int = 32,
        in_channels: int = 1,
        bn_stats: str = "all",
        backend: str = "auto",
    ):
        super().__init__()
        if mask_layers not in SMALL_SELECTIONS:
            raise ValueError(f"mask_layers must be one of {tuple(SMALL_SELECTIONS)} for the small CNN, got {mask_layers!r}")
        ratio = check_ratio(mask_ratio, "mask_ratio")
        self.mask_mode = check_mode(mask_mode, group_size, name="mask_mode")
        # The conv index plays the role of ResNet's stage in _MaskSpec.
        self.stage_ratios = {i: ratio for i in SMALL_SELECTIONS[mask_layers]} if ratio > 0 else {}
        spec = _MaskSpec(self.stage_ratios, self.mask_mode, group_size, seed, bn_stats, backend)
        half = (input_size - 1) // 2 + 1  # conv3: stride 2, padding 1
        layers = [  # (in, out, stride, output size)
            (in_channels, width, 1, input_size),
            (width, width, 1, input_size),
            (width, 2 * width, 2, half),
            (2 * width, 2 * width, 1, half),
        ]
        for i, (c_in, c_out, stride, size) in enumerate(layers, start=1):
            conv, bn = spec.conv_bn(f"conv{i}", i, c_in, c_out, 3, stride, 1, size, "relu")
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", bn)
        self.fc = nn.Linear(2 * width, num_classes)
        wire_input_masks(self)  # a masked conv after a masked conv skips its zero inputs

    def forward(self, x):
        for i in range(1, 5):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            x = _relu_unless_fused(conv, bn(conv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn(num_classes: int = 10, **kwargs) -> SmallCNN:
    """The small CNN for digits / MNIST. Keywords: width (32), mask_ratio, mask_layers
    ("shallow" = conv1, conv2; "deep"; "all"), mask_mode, group_size, seed, input_size (32),
    in_channels (1), bn_stats, backend."""
    return SmallCNN(num_classes, **kwargs)
