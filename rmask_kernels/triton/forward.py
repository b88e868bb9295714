"""The host launcher of the forward (kernels: forward_kernels.py): which kernel runs, its grid and
block sizes, and the per-channel statistics summed from the kernels' partials."""

from __future__ import annotations

import torch
import triton

from . import common
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
    index = (kept_offsets, kept_positions, position_offsets, position_channels)
    extra = (("residual", residual),) if residual is not None else ()
    geometry = check_args("triton_masked_conv2d", input, weight, bias, mask, index, stride, padding, dilation,
                          groups, extra)
    shape = (geometry.batch, geometry.out_channels, geometry.out_height, geometry.out_width)
    if residual is not None and tuple(residual.shape) != shape:
        raise RuntimeError(f"triton_masked_conv2d: residual must have the output's shape {shape}, "
                           f"got {tuple(residual.shape)}")
    memory_format = torch._prims_common.suggest_memory_format(input)
    if residual is not None:  # masked positions get relu?(residual); kept ones are overwritten
        output = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
        output.copy_(residual)
        if relu:
            output.clamp_min_(0)
    else:
        output = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format).zero_()
    stats_shape = (geometry.out_channels,) if channel_stats else (0,)
    sums = torch.zeros(stats_shape, dtype=torch.float64, device=input.device)
    squares = torch.zeros(stats_shape, dtype=torch.float64, device=input.device)
    if output.numel() == 0 or kept_positions.numel() == 0:
        return output, sums, squares

    kept_offsets, kept_positions = kept_offsets.contiguous(), kept_positions.contiguous()
    position_offsets, position_channels = position_offsets.contiguous(), position_channels.contiguous()
    # Absent tensors are passed as the output: never read (HAS_BIAS, HAS_RESIDUAL are False).
    bias_arg = bias.contiguous() if bias is not None else output
    residual_arg = residual if residual is not None else output
    constexprs = dict(
        KH=geometry.kernel_h, KW=geometry.kernel_w, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=bool(relu), STATS=bool(channel_stats), num_warps=common.NUM_WARPS, **common.dot_options(input.dtype),
    )
    constexprs.update(common.register_options(input.dtype, constexprs["PRECISION"]))
    conv_params = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    strides = (*input.stride(), *weight.stride(), *residual_arg.stride(), *output.stride())
    positions = geometry.out_height * geometry.out_width
    block_k = common.reduction_block(input.dtype, constexprs["PRECISION"])  # tl.dot's K

    variant = forward_variant(geometry)
    if variant == "by_position":
        # M = the batch, N = the channels kept per position (on average: the index's size
        # tells without a sync), each at least tl.dot's 16.
        block_m = min(common.BLOCK_M, max(16, triton.next_power_of_2(geometry.batch)))
        block_n = min(common.BLOCK_N,
                      max(16, triton.next_power_of_2(triton.cdiv(position_channels.numel(), positions))))
        image_blocks = triton.cdiv(geometry.batch, block_m)
        grid = (positions, image_blocks, triton.cdiv(geometry.out_channels, block_n))
        partial_sums, partial_squares = _stats_partials(channel_stats, positions * image_blocks,
                                                        geometry.out_channels, input.device)
        constexprs["INDEX"] = common.index_type(input, weight, residual_arg, output, partial_sums, *index)
        forward_by_position_kernel[grid](
            input, weight, bias_arg, residual_arg, output, partial_sums, partial_squares,
            position_offsets, position_channels,
            geometry.batch, image_blocks, geometry.out_channels, geometry.in_channels, geometry.height,
            geometry.width, geometry.out_width, *conv_params, *strides,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **constexprs,
        )
    else:
        all_positions = variant == "all_positions"
        patterns = 1 if all_positions else geometry.patterns
        rows_per_image = positions if all_positions else kept_positions.numel()
        tile_ends, tiles = row_tiles(kept_offsets, geometry.batch, patterns, rows_per_image, common.BLOCK_M)
        segments, num_segments = channel_segments(
            patterns, geometry.out_channels // patterns, geometry.cout_per_group, common.BLOCK_N, str(input.device))
        partial_sums, partial_squares = _stats_partials(channel_stats, tiles, geometry.out_channels, input.device)
        constexprs["INDEX"] = common.index_type(input, weight, residual_arg, output, mask, partial_sums, *index)
        forward_by_pattern_kernel[(tiles, num_segments)](
            input, weight, bias_arg, residual_arg, output, mask.contiguous().view(torch.uint8), partial_sums,
            partial_squares, kept_offsets, kept_positions, tile_ends, segments,
            geometry.batch, rows_per_image, patterns, num_segments, geometry.out_channels,
            geometry.cin_per_group, geometry.cout_per_group, geometry.height, geometry.width, geometry.out_width,
            *conv_params, *strides, positions if mask.shape[0] > 1 else 0,
            PATTERN_BLOCK=pattern_block(patterns), ALL_POSITIONS=all_positions,
            BLOCK_M=common.BLOCK_M, BLOCK_N=common.BLOCK_N, BLOCK_K=block_k,
            **constexprs,
        )
    if channel_stats:
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
