"""The host launcher of the forward (kernels: forward_kernels.py): which kernel runs, its grid and
block configuration (configs.py), and the per-channel statistics summed from the kernels' partials."""

from __future__ import annotations

import torch
import triton

from . import common, configs
from .forward_kernels import forward_by_pattern_kernel, forward_by_position_kernel
from .geometry import check_args
from .tiles import channel_segments, pattern_block, row_tiles


def forward_variant(geometry):
    """Which forward kernel runs: "by_pattern" (rows of each pattern's kept positions, its
    channels as N), "by_position" (per output position, the channels kept there as N) or
    "all_positions" (the by-pattern kernel over every position, the stores predicated on the
    mask)."""
    if geometry.channels_per_pattern >= common.MIN_PATTERN_CHANNELS:
        return "by_pattern"
    if geometry.groups == 1:
        return "by_position"
    # Few channels per pattern and groups > 1: the by-position gather would mix conv groups
    # in one tile.
    return "all_positions"


def masked_conv2d_forward(input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                          position_channels, stride, padding, dilation, groups, residual=None, relu=False,
                          channel_stats=False):
    """relu?(mask * (conv + bias) + residual) and, with channel_stats, the float64 sum and sum of
    squares per channel of the (kept) outputs: (output, sums, squares); empty sums without."""
    index = (kept_offsets.contiguous(), kept_positions.contiguous(), position_offsets.contiguous(),
             position_channels.contiguous())
    extra = (("residual", residual),) if residual is not None else ()
    geometry = check_args("triton_masked_conv2d", input, weight, bias, mask, index, stride, padding, dilation,
                          groups, extra)
    shape = (geometry.batch, geometry.out_channels, geometry.out_height, geometry.out_width)
    if residual is not None and tuple(residual.shape) != shape:
        raise RuntimeError(f"triton_masked_conv2d: residual must have the output's shape {shape}, "
                           f"got {tuple(residual.shape)}")
    call = _Forward(geometry, input, weight, bias, mask, index, (*stride, *padding, *dilation), residual, relu,
                    channel_stats)
    if call.output_only():
        return call.run(None)
    config = configs.choose("forward", call.operands, call.key(), call.rows(), call.run, call.wide)
    return call.run(config)


class _Forward:
    """One forward call's arguments, and its launch with a given block configuration."""

    def __init__(self, geometry, input, weight, bias, mask, index, conv_params, residual, relu, channel_stats):
        self.geometry, self.input, self.weight, self.bias, self.mask = geometry, input, weight, bias, mask
        self.kept_offsets, self.kept_positions, self.position_offsets, self.position_channels = index
        self.conv_params, self.residual, self.relu, self.channel_stats = conv_params, residual, bool(relu), channel_stats
        self.dot = common.dot_options(input.dtype)
        self.operands = configs.operand_class(input.dtype, self.dot["PRECISION"])
        self.variant = forward_variant(geometry)
        self.positions = geometry.out_height * geometry.out_width
        # Whether the launch takes int64 offsets (the configs for them: configs.WIDE_CONFIGS);
        # the buffers sized by a config stay below the output's size.
        self.wide = common.needs_int64(input, weight, residual, mask, *index) \
            or geometry.batch * geometry.out_channels * self.positions >= common.INT32_LIMIT

    def output_only(self):
        """Whether no kernel runs: the output is empty or nothing is kept."""
        return self.input.shape[0] * self.geometry.out_channels * self.positions == 0 \
            or self.kept_positions.numel() == 0

    def rows(self):
        """The M extent of the kernel's launch: images per position, or rows of every pattern."""
        if self.variant == "by_position":
            return self.geometry.batch
        rows_per_image = self.positions if self.variant == "all_positions" else self.kept_positions.numel()
        return self.geometry.batch * rows_per_image

    def key(self):
        return configs.launch_key(
            self.input, self.weight, self.bias, self.residual, self.mask,
            extra=(self.conv_params, self.geometry.groups, self.geometry.patterns, self.kept_positions.numel(),
                   self.position_channels.numel(), self.relu, self.channel_stats))

    def run(self, config):
        """(output, sums, squares) computed with `config` (None: when output_only)."""
        geometry, input = self.geometry, self.input
        shape = (geometry.batch, geometry.out_channels, geometry.out_height, geometry.out_width)
        memory_format = torch._prims_common.suggest_memory_format(input)
        output = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
        if self.residual is not None:  # masked positions get relu?(residual); kept ones are overwritten
            output.copy_(self.residual)
            if self.relu:
                output.clamp_min_(0)
        else:
            output.zero_()
        stats_shape = (geometry.out_channels,) if self.channel_stats else (0,)
        sums = torch.zeros(stats_shape, dtype=torch.float64, device=input.device)
        squares = torch.zeros(stats_shape, dtype=torch.float64, device=input.device)
        if config is None:
            return output, sums, squares

        # The kernels read the input and the weight with input channels contiguous (channels
        # last): only then are their K tiles contiguous, and the compiled code loads them with
        # 16-byte vector copies (docs/design.md, 3.4). Others are converted once, here.
        input = input.contiguous(memory_format=torch.channels_last)
        weight = self.weight.contiguous(memory_format=torch.channels_last)
        index = (self.kept_offsets, self.kept_positions, self.position_offsets, self.position_channels)
        # Absent tensors are passed as the output: never read (HAS_BIAS, HAS_RESIDUAL are False).
        bias_arg = self.bias.contiguous() if self.bias is not None else output
        residual_arg = self.residual if self.residual is not None else output
        constexprs = dict(
            KH=geometry.kernel_h, KW=geometry.kernel_w, HAS_BIAS=self.bias is not None,
            HAS_RESIDUAL=self.residual is not None, RELU=self.relu, STATS=bool(self.channel_stats),
            BLOCK_K=config.block_k, **self.dot, **config.launch_options(),
        )
        strides = (*input.stride(), *weight.stride(), *residual_arg.stride(), *output.stride())
        positions = self.positions
        if self.variant == "by_position":
            # M = the batch, N = the channels kept per position (on average: the index's size
            # tells without a sync), each at least tl.dot's 16.
            block_m = min(config.block_m, max(16, triton.next_power_of_2(geometry.batch)))
            block_n = min(config.block_n,
                          max(16, triton.next_power_of_2(triton.cdiv(self.position_channels.numel(), positions))))
            image_blocks = triton.cdiv(geometry.batch, block_m)
            grid = (positions, image_blocks, triton.cdiv(geometry.out_channels, block_n))
            partial_sums, partial_squares = _stats_partials(self.channel_stats, positions * image_blocks,
                                                            geometry.out_channels, input.device)
            forward_by_position_kernel[grid](
                input, weight, bias_arg, residual_arg, output, partial_sums, partial_squares,
                self.position_offsets, self.position_channels,
                geometry.batch, image_blocks, geometry.out_channels, geometry.in_channels, geometry.height,
                geometry.width, geometry.out_width, *self.conv_params, *strides,
                BLOCK_M=block_m, BLOCK_N=block_n,
                INDEX=common.index_type(input, weight, residual_arg, output, partial_sums, *index),
                **constexprs,
            )
        else:
            all_positions = self.variant == "all_positions"
            patterns = 1 if all_positions else geometry.patterns
            rows_per_image = positions if all_positions else self.kept_positions.numel()
            tile_ends, tiles = row_tiles(self.kept_offsets, geometry.batch, patterns, rows_per_image, config.block_m)
            segments, num_segments = channel_segments(
                patterns, geometry.out_channels // patterns, geometry.cout_per_group, config.block_n,
                str(input.device))
            partial_sums, partial_squares = _stats_partials(self.channel_stats, tiles, geometry.out_channels,
                                                            input.device)
            forward_by_pattern_kernel[(tiles, num_segments)](
                input, weight, bias_arg, residual_arg, output, self.mask.contiguous().view(torch.uint8),
                partial_sums, partial_squares, self.kept_offsets, self.kept_positions, tile_ends, segments,
                geometry.batch, rows_per_image, patterns, num_segments, geometry.out_channels,
                geometry.cin_per_group, geometry.cout_per_group, geometry.height, geometry.width, geometry.out_width,
                *self.conv_params, *strides, positions if self.mask.shape[0] > 1 else 0,
                PATTERN_BLOCK=pattern_block(patterns), ALL_POSITIONS=all_positions,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                INDEX=common.index_type(input, weight, residual_arg, output, self.mask, partial_sums, *index),
                **constexprs,
            )
        if self.channel_stats:
            # fp32 partials per tile, then one float64 sum over the tiles in a fixed order.
            sums = partial_sums.double().sum(0)
            squares = partial_squares.double().sum(0)
        return output, sums, squares


def _stats_partials(wanted, rows, channels, device):
    """The fp32 (sums, squares) rows the kernels write per tile: (rows, channels) each when
    the statistics are wanted, else empty."""
    if not wanted:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty
    return (torch.zeros(rows, channels, dtype=torch.float32, device=device),
            torch.zeros(rows, channels, dtype=torch.float32, device=device))
