"""The argument checks of the Triton ops and the geometry they return (the sizes every host
launcher reads)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..functional import conv_output_size
from .common import SUPPORTED_DTYPES

INDEX_NAMES = ("kept_offsets", "kept_positions", "position_offsets", "position_channels")


class Geometry(NamedTuple):
    """The sizes of one call: input (batch, in_channels, height, width), weight (out_channels,
    kernel_h, kernel_w), output (out_height, out_width), conv groups and mask patterns."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    out_height: int
    out_width: int
    groups: int
    patterns: int

    @property
    def channels_per_pattern(self):
        return self.out_channels // self.patterns

    @property
    def cin_per_group(self):
        return self.in_channels // self.groups

    @property
    def cout_per_group(self):
        return self.out_channels // self.groups


def check_args(op, input, weight, bias, mask, index, stride, padding, dilation, groups, extra=()):
    """The checks the C++ ops make (csrc/masked_conv2d_common.h) that these kernels rely on;
    `op` names the op in the messages, `index` is the kept index (INDEX_NAMES), `extra` more
    (name, tensor) pairs that must match the input's dtype and device."""
    if input.dim() != 4 or weight.dim() != 4:
        raise RuntimeError(f"{op}: input and weight must be 4-D, got shapes {tuple(input.shape)} and "
                           f"{tuple(weight.shape)}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"{op}: the Triton kernels take float32, float16 or bfloat16 input, got {input.dtype}")
    for what, tensor in (("weight", weight), ("bias", bias)) + tuple(extra):
        if tensor is not None and tensor.dtype != input.dtype:
            raise RuntimeError(f"{op}: {what} dtype must match input dtype {input.dtype}, got {tensor.dtype}")
    tensors = (("weight", weight), ("bias", bias), ("mask", mask)) + tuple(extra) + tuple(
        (f"the kept index ({what})", tensor) for what, tensor in zip(INDEX_NAMES, index))
    for what, tensor in tensors:
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(f"{op}: {what} must be on the input's device {input.device}, got {tensor.device}")
    for what, tensor in zip(INDEX_NAMES, index):
        if tensor.dtype != torch.int64 or tensor.dim() != 1:
            raise RuntimeError(f"{op}: {what} must be a 1-D int64 tensor, got {tensor.dtype} of shape "
                               f"{tuple(tensor.shape)}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2 or min(stride) <= 0 or min(dilation) <= 0 \
            or min(padding) < 0 or groups <= 0:
        raise RuntimeError(f"{op}: bad stride {stride}, padding {padding}, dilation {dilation} or groups {groups}")
    batch, in_channels, height, width = input.shape
    out_channels, cin_per_group, kernel_h, kernel_w = weight.shape
    if in_channels != cin_per_group * groups or out_channels % groups:
        raise RuntimeError(f"{op}: input channels must be weight.size(1) * groups = {cin_per_group * groups} and "
                           f"out channels {out_channels} divisible by groups {groups}, got {in_channels} input "
                           "channels")
    out_h, out_w = conv_output_size((height, width), (kernel_h, kernel_w), stride,
                                    (padding[0], padding[0], padding[1], padding[1]), dilation)
    if out_h <= 0 or out_w <= 0:
        raise RuntimeError(f"{op}: output size would be {out_h}x{out_w} for input {height}x{width}: input too small")
    if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] not in (1, out_channels) \
            or tuple(mask.shape[1:]) != (out_h, out_w):
        raise RuntimeError(f"{op}: mask must be bool of shape ({out_channels} or 1, {out_h}, {out_w}), got "
                           f"{mask.dtype} of shape {tuple(mask.shape)}")
    kept_offsets, kept_positions, position_offsets, position_channels = index
    patterns = kept_offsets.numel() - 1
    if patterns < 1 or out_channels % patterns or (mask.shape[0] == 1 and patterns != 1):
        raise RuntimeError(f"{op}: kept_offsets describes {patterns} mask patterns, which must divide the "
                           f"{out_channels} output channels (1 for a (1, H, W) mask)")
    if position_offsets.numel() != out_h * out_w + 1:
        raise RuntimeError(f"{op}: position_offsets must be a 1-D int64 tensor of Hout * Wout + 1 = "
                           f"{out_h * out_w + 1} entries, got {position_offsets.dtype} of shape "
                           f"{tuple(position_offsets.shape)}")
    # Sizes only, as check_kept_index_sizes in csrc/masked_conv2d_common.h (same messages): the
    # values are checked once, in Python (rk.check_kept_index), not per call.
    channels_per_pattern = out_channels // patterns
    if kept_positions.numel() > patterns * out_h * out_w:
        raise RuntimeError(f"{op}: kept_positions lists {kept_positions.numel()} positions, more than the "
                           f"{patterns} patterns of Hout * Wout = {out_h * out_w} outputs hold")
    pairs = kept_positions.numel() * channels_per_pattern
    if position_channels.numel() != pairs:
        raise RuntimeError(f"{op}: position_channels must list the {pairs} kept (position, channel) pairs of "
                           f"kept_offsets/kept_positions, got {position_channels.numel()}")
    return Geometry(batch, in_channels, height, width, out_channels, kernel_h, kernel_w, out_h, out_w, groups,
                    patterns)


def masked_input(op, input, input_mask, input_offsets=None, input_channels=None):
    """``input * input_mask`` (``input`` itself when ``input_mask`` is None), after the checks
    the C++ ops make on it and its lists (csrc/masked_conv2d_common.h, checked_input_mask). The
    Triton kernels multiply masked inputs out rather than skip them: they read no list."""
    if input_mask is None:
        if input_offsets is not None or input_channels is not None:
            raise RuntimeError(f"{op}: input_offsets and input_channels are the lists of an input_mask, "
                               "got them without one")
        return input
    _, in_channels, height, width = input.shape
    if input_mask.dtype != torch.bool:
        raise RuntimeError(f"{op}: input_mask must be a bool tensor, got {input_mask.dtype}")
    if input_mask.dim() != 3 or input_mask.shape[0] not in (1, in_channels) \
            or tuple(input_mask.shape[1:]) != (height, width):
        raise RuntimeError(f"{op}: input_mask must have shape ({in_channels} or 1, {height}, {width}) for this "
                           f"input, got {tuple(input_mask.shape)}")
    if input_mask.device != input.device:
        raise RuntimeError(f"{op}: input_mask must be on the input's device {input.device}, got {input_mask.device}")
    if input_offsets is None or input_channels is None:
        missing = "input_channels" if input_offsets is not None else "input_offsets"
        raise RuntimeError(f"{op}: input_mask comes with its lists input_offsets and input_channels "
                           "(rk.kept_index(input_mask, in_channels).position_offsets/.position_channels), "
                           f"got no {missing}")
    for name, lists in (("input_offsets", input_offsets), ("input_channels", input_channels)):
        if lists.dtype != torch.int64 or lists.dim() != 1:
            raise RuntimeError(f"{op}: {name} must be a 1-D int64 tensor, got {lists.dtype} "
                               f"of shape {tuple(lists.shape)}")
        if lists.device != input.device:
            raise RuntimeError(f"{op}: {name} must be on the input's device {input.device}, got {lists.device}")
    if input_offsets.numel() != height * width + 1:
        raise RuntimeError(f"{op}: input_offsets must have H * W + 1 = {height * width + 1} entries for this input, "
                           f"got {input_offsets.numel()}")
    return input * input_mask
