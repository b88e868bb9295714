"""What the hand-masked models share: stage selections and per-stage ratios, the paper's
controls (wider or narrower selected stages, dropout in the deep stages), and one builder of
conv + BN pairs, so every model draws its masks from ``layer_seed(seed, conv name)`` and puts a
masked pair in the same slots as rk.convert_model.

A staged model (ResNet-18/50, SENet-18, DenseNet-121) has stages 0 = stem and 1..4 (its four
block groups); each model's docstring says which convs each stage holds.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch.nn as nn
import torch.nn.functional as F

from ..masks import check_mode, check_ratio, layer_seed
from ..nn import MaskedConv2d, MaskedConvBN2d
from .dropblock import DropBlock2d, check_block_size, check_drop_probability

STAGE_SELECTIONS = {"shallow": "012", "deep": "34", "all": "01234"}
DEEP_STAGES = (3, 4)  # where deep_dropout goes
DEEP_DROPOUT_FORMS = "'dropout2d:P' or 'dropblock:P:BLOCK' (P in [0, 1), BLOCK a positive int)"


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


def selected_stages(mask_ratio, mask_layers) -> list:
    """The stages a model's masks select, whatever the ratio (0 included): the mapping's
    stages when ``mask_ratio`` gives separate ratios, else ``mask_layers``'."""
    if isinstance(mask_ratio, Mapping):
        return sorted(parse_stage_ratios(mask_ratio, mask_layers))
    return _parse_stages(mask_layers)


def check_scale(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def stage_scales(mask_ratio, mask_layers, width_multiplier=1.0, channels_fraction=1.0) -> Dict[int, float]:
    """{stage: channel scale} for the paper's controls on the selected stages:
    ``width_multiplier`` (2 = "2× wider masked stages") or ``channels_fraction`` ("fewer
    channels instead of masks": only with ``mask_ratio`` 0, the stages then have no mask)."""
    width = check_scale(width_multiplier, "width_multiplier")
    fraction = check_scale(channels_fraction, "channels_fraction")
    if fraction > 1:
        raise ValueError(
            f"channels_fraction must be in (0, 1] (the fraction of channels kept), got {channels_fraction!r}"
        )
    if width != 1 and fraction != 1:
        raise ValueError(
            f"give width_multiplier or channels_fraction, not both (got width_multiplier={width_multiplier!r}, "
            f"channels_fraction={channels_fraction!r})"
        )
    if fraction != 1 and any(ratio > 0 for ratio in parse_stage_ratios(mask_ratio, mask_layers).values()):
        raise ValueError(
            f"channels_fraction replaces the masks of the selected stages: expected mask_ratio 0 with "
            f"channels_fraction={channels_fraction!r}, got mask_ratio={mask_ratio!r}"
        )
    scale = width if width != 1 else fraction
    return {} if scale == 1 else {stage: scale for stage in selected_stages(mask_ratio, mask_layers)}


def scaled_channels(channels: int, scale: float) -> int:
    """``channels`` × ``scale``, rounded, at least 1."""
    return max(1, int(round(channels * scale)))


def parse_deep_dropout(spec) -> Optional[str]:
    """The canonical form of a deep-stage dropout ("dropout2d:P", "dropblock:P:BLOCK"), or
    None for none (None, "" or "none")."""
    if spec is None or spec in ("", "none"):
        return None
    parts = spec.split(":") if isinstance(spec, str) else []
    try:
        if parts and parts[0] == "dropout2d" and len(parts) == 2:
            return f"dropout2d:{check_drop_probability(float(parts[1])):g}"
        if parts and parts[0] == "dropblock" and len(parts) == 3:
            p = check_drop_probability(float(parts[1]))
            return f"dropblock:{p:g}:{check_block_size(int(parts[2]))}"
    except (TypeError, ValueError):
        pass
    raise ValueError(f"deep_dropout must be {DEEP_DROPOUT_FORMS}, got {spec!r}")


def deep_dropout_module(spec) -> Optional[nn.Module]:
    """A fresh module for ``spec`` (see `parse_deep_dropout`), or None."""
    canonical = parse_deep_dropout(spec)
    if canonical is None:
        return None
    kind, *values = canonical.split(":")
    if kind == "dropout2d":
        return nn.Dropout2d(float(values[0]))
    return DropBlock2d(float(values[0]), int(values[1]))


class _MaskSpec:
    """How to build the layers of one model: which stages are masked and at what ratio, their
    channel scales, and the deep stages' dropout."""

    def __init__(self, stage_ratios, mode, group_size, seed, bn_stats, backend, scales=None, deep_dropout=None):
        self.stage_ratios, self.mode, self.group_size = stage_ratios, mode, group_size
        self.seed, self.bn_stats, self.backend = seed, bn_stats, backend
        self.scales = dict(scales or {})
        self.deep_dropout = parse_deep_dropout(deep_dropout)

    @classmethod
    def for_stages(cls, *, mask_ratio, mask_layers, mask_mode, group_size, seed, bn_stats, backend,
                   width_multiplier=1.0, channels_fraction=1.0, deep_dropout=None) -> "_MaskSpec":
        """The spec of a staged model from its constructor's keywords (every one checked)."""
        stage_ratios = parse_stage_ratios(mask_ratio, mask_layers)
        mode = check_mode(mask_mode, group_size, name="mask_mode")
        scales = stage_scales(mask_ratio, mask_layers, width_multiplier, channels_fraction)
        return cls(stage_ratios, mode, group_size, seed, bn_stats, backend, scales, deep_dropout)

    def channels(self, stage: int, channels: int) -> int:
        """The width of ``stage`` for a layer of ``channels`` in the unscaled network."""
        return scaled_channels(channels, self.scales[stage]) if stage in self.scales else channels

    def dropout(self, stage: int) -> Optional[nn.Module]:
        """A fresh deep-stage dropout module for a block of ``stage``, or None."""
        return deep_dropout_module(self.deep_dropout) if stage in DEEP_STAGES else None

    def _mask_kwargs(self, name, ratio, out_size):
        return dict(
            mask_ratio=ratio, mask_mode=self.mode, group_size=self.group_size, seed=layer_seed(self.seed, name),
            output_size=(out_size, out_size), backend=self.backend,
        )

    def conv_bn(self, name, stage, in_ch, out_ch, kernel, stride, padding, out_size, activation=None):
        """(conv, BN) for a conv followed by its own BN; masked: (MaskedConvBN2d, nn.Identity)."""
        ratio = self.stage_ratios.get(stage, 0.0)
        if ratio == 0.0:
            return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False), nn.BatchNorm2d(out_ch)
        unit = MaskedConvBN2d(
            in_ch, out_ch, kernel, stride, padding, bias=False, bn_stats=self.bn_stats, activation=activation,
            **self._mask_kwargs(name, ratio, out_size),
        )
        return unit, nn.Identity()

    def conv(self, name, stage, in_ch, out_ch, kernel, stride, padding, out_size):
        """A conv with no BN of its own after it (the mask goes on its output), as
        rk.convert_model masks such a conv: a MaskedConv2d."""
        ratio = self.stage_ratios.get(stage, 0.0)
        if ratio == 0.0:
            return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
        mask_kwargs = self._mask_kwargs(name, ratio, out_size)
        return MaskedConv2d(in_ch, out_ch, kernel, stride, padding, bias=False, **mask_kwargs)


def _relu_unless_fused(conv: nn.Module, out):
    """ReLU, unless the conv slot holds a unit that already applied it in its epilogue."""
    return out if isinstance(conv, MaskedConvBN2d) and conv.activation == "relu" else F.relu(out)


def _dropped(drop: Optional[nn.Module], out):
    return out if drop is None else drop(out)
