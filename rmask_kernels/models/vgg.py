"""The CIFAR VGG-19 with BatchNorm (16 3×3 convs, 5 max-pools, FC 512 → classes, as in the
paper's released code) with Random Mask placed by hand: after BN, before ReLU.

"shallow" (the paper's VGG-19 setting) masks the first 4 convs (64×32×32 twice, 128×16×16
twice on CIFAR-10), exactly what rk.convert_model(layers="shallow") selects on the unmasked
network; "deep" masks the other 12; "all" all 16. A masked conv + BN pair is one MaskedConvBN2d
(ReLU fused) in the conv's slot of ``features``, with nn.Identity in the BN's and ReLU's slots,
and the masks are drawn from ``layer_seed(seed, "features.<index>")``, so checkpoints and masks
match rk.convert_model(vgg19(mask_ratio=0), ...) with the same seed.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..masks import check_mode, check_ratio
from ..wiring import wire_input_masks
from .stages import _MaskSpec  # one construction path for all hand-placed models

VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
SHALLOW_CONVS = 4  # the paper masks VGG-19's first 4 convs


def _selected_convs(mask_layers: str, count: int) -> range:
    selections = {"shallow": range(SHALLOW_CONVS), "deep": range(SHALLOW_CONVS, count), "all": range(count)}
    if mask_layers not in selections:
        raise ValueError(f"mask_layers must be one of {tuple(selections)} for VGG-19, got {mask_layers!r}")
    return selections[mask_layers]


class VGG19(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        *,
        mask_ratio: float = 0.0,
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
        if input_size < 32:  # five 2×2 max-pools
            raise ValueError(f"VGG-19 needs inputs of at least 32×32 (five 2×2 max-pools), got input_size={input_size}")
        ratio = check_ratio(mask_ratio, "mask_ratio")
        self.mask_mode = check_mode(mask_mode, group_size, name="mask_mode")
        conv_count = sum(1 for v in VGG19_LAYERS if v != "M")
        # The conv's index among the convs plays the role of ResNet's stage in _MaskSpec.
        self.stage_ratios = {i: ratio for i in _selected_convs(mask_layers, conv_count)} if ratio > 0 else {}
        spec = _MaskSpec(self.stage_ratios, self.mask_mode, group_size, seed, bn_stats, backend)
        layers, channels, size, conv_index = [], in_channels, input_size, 0
        for value in VGG19_LAYERS:
            if value == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            conv, bn = spec.conv_bn(f"features.{len(layers)}", conv_index, channels, value, 3, 1, 1, size, "relu")
            # A masked unit applies the ReLU itself (in the kernel's epilogue in eval mode).
            relu = nn.Identity() if isinstance(bn, nn.Identity) else nn.ReLU(inplace=True)
            layers += [conv, bn, relu]
            channels, conv_index = value, conv_index + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 1×1 already on 32×32 inputs
        self.classifier = nn.Linear(512, num_classes)
        wire_input_masks(self)  # a masked conv after a masked conv (or its max-pool) skips its zero inputs

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg19(num_classes: int = 10, **kwargs) -> VGG19:
    """The CIFAR VGG-19 (BN). Keywords: mask_ratio, mask_layers ("shallow" = first 4 convs,
    the paper's; "deep"; "all"), mask_mode, group_size, seed, input_size (32), in_channels (3),
    bn_stats, backend."""
    return VGG19(num_classes, **kwargs)
