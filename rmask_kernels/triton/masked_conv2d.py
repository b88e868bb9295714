"""Triton kernels of the masked convolution and their host launchers (the autograd glue is in
rmask_kernels/ops.py, the op registration in rmask_kernels/triton/__init__.py).

Every kernel is an implicit GEMM whose input rows are loaded by computed addresses (strides
passed in, bounds masks for the padding), accumulating in fp32 and computing kept outputs only:

forward, by pattern   per mask pattern p (P patterns of channels_per_pattern channels each):
                      M = (image, kept position of p), N = p's channels (cut at conv-group
                      boundaries), K = (tap, input channel of the group).
forward, by position  neuron-like masks (few channels per pattern), groups == 1: per output
                      position q, M = images, N = the channels kept at q (weight rows gathered).
                      With groups > 1 such masks take the by-pattern kernel over every
                      position instead, its stores predicated on the mask (simpler, dense FLOPs).
grad input            gather form: M = input pixels, N = input channels, K = (tap, output
                      channel); grad_output is loaded only where the mask keeps it. Sparse
                      masks: spatial by tap (M = kept rows, one launch per tap), neuron-like
                      by input position (K = the channels kept where each tap lands).
grad weight           two stages: chunks of kept rows each give fp32 partials, summed in a
                      fixed order (deterministic, no atomics). Neuron-like masks: chunks of
                      every row, grad_output read only where kept; sparse ones (groups == 1):
                      per (position, kept channel) pair a row reduced over the images, then
                      per channel its pairs' rows summed in position order.
grad bias             per channel sum of grad_output over the kept positions (torch reduction).

Block sizes are one fixed configuration (no GPU was lent to tune them; see benchmarks/gpu_times.py).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Read when the kernels are defined, as triton itself does (triton.jit checks it then).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Channels per mask pattern from which the by-pattern forward fills a tile's N dimension well
# enough; below it (neuron masks, small groups) the by-position forward takes the kept channels
# of each position as N instead. Unmeasured on a GPU: tl.dot's smallest N is 16.
MIN_PATTERN_CHANNELS = 16

# The grad-weight partials (chunks × Cout × Cin/groups·kh·kw fp32) stay within this: large
# layers get fewer, longer chunks of rows (WEIGHT_CHUNK is the shortest).
PARTIAL_BUDGET_BYTES = 64 << 20

# Masks keeping at most this fraction take a sparse grad input (keep × dense FLOPs) instead of
# the gather over every input pixel and output channel (dense FLOPs, grad_output reads
# predicated, one pass): spatial masks by tap (kept rows only, one launch per tap adding into an
# fp32 buffer), neuron-like masks (groups == 1) by input position (the channels kept at each
# tapped output position gathered as K). Neuron-like masks (groups == 1) also take a sparse grad
# weight: per (position, kept channel) pair its batch-reduced row, then per channel the sum of
# its pairs' rows in position order. Unmeasured on a GPU: a guess that the extra launches,
# buffers and narrow tiles pay off once two thirds of the work is skipped.
SPARSE_BACKWARD_MAX_KEEP = 0.35

# The interpreter costs ~0.5 ms per program and runs tl.dot as a numpy matmul: big blocks.
if INTERPRET:
    BLOCK_M, BLOCK_N, BLOCK_K, WEIGHT_CHUNK, NUM_WARPS = 128, 64, 32, 4096, 4
else:
    BLOCK_M, BLOCK_N, BLOCK_K, WEIGHT_CHUNK, NUM_WARPS = 64, 64, 32, 1024, 4

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- kernels ----------------------------------------------------------------------------------

@triton.jit
def _cast(value, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 `value` in `dtype`, rounded to nearest even (the interpreter truncates to bf16)."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = value.to(dtype)
    return result


@triton.jit
def _locate_tile(tile, tile_ends_ptr, kept_offsets_ptr, num_patterns, rows_per_image,
                 PATTERN_BLOCK: tl.constexpr):
    """The pattern of global row tile `tile` (tiles of pattern p are numbered contiguously;
    tile_ends[p] is one past its last), the tile's number within the pattern, where its kept
    positions start in kept_positions and how many it keeps. pattern = -1: no such tile."""
    pattern = tile * 0
    local_tile = tile
    position_start = tile * 0
    count = tile * 0 + rows_per_image
    if PATTERN_BLOCK > 1:
        index = tl.arange(0, PATTERN_BLOCK)
        ends = tl.load(tile_ends_ptr + index, mask=index < num_patterns, other=4611686018427387904)
        pattern = tl.sum((ends <= tile).to(tl.int64), axis=0)
        valid = pattern < num_patterns
        first = tl.load(tile_ends_ptr + pattern - 1, mask=valid & (pattern > 0), other=0)
        local_tile = tile - first
        position_start = tl.load(kept_offsets_ptr + pattern, mask=valid, other=0)
        count = tl.load(kept_offsets_ptr + pattern + 1, mask=valid, other=0) - position_start
        pattern = tl.where(valid, pattern, -1)
    return pattern, local_tile, position_start, count


@triton.jit
def _tile_channels(tile, segment, tile_ends_ptr, kept_offsets_ptr, segments_ptr, num_patterns, num_segments,
                   rows_per_image, cout_per_group, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """What program (tile, segment) of a by-pattern kernel covers: its tile's place in the
    pattern (_locate_tile), and the segment's channels (consecutive channels of the pattern
    inside one conv group, at most BLOCK_N) with their conv group. No channel is valid
    (col_ok all False) when the tile or the segment is past the end: the program has no work."""
    pattern, local_tile, position_start, count = _locate_tile(
        tile, tile_ends_ptr, kept_offsets_ptr, num_patterns, rows_per_image, PATTERN_BLOCK)
    entry = segments_ptr + (tl.maximum(pattern, 0) * num_segments + segment) * 2
    channel_start = tl.load(entry)
    channel_count = tl.where(pattern >= 0, tl.load(entry + 1), 0)
    cols = tl.arange(0, BLOCK_N)
    return (local_tile, position_start, count, channel_start // cout_per_group, channel_start + cols,
            cols < channel_count)


@triton.jit
def _dot_tap(acc, a_rows, a_ok, xs_c, w_tap, channel, col_ok, channels, ws_o, ws_i,
             INTERPRETER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += input rows (a_rows: each row's pixel of this tap, a_ok: inside the image) times the
    tap's weights (w_tap) of `channel`, over `channels` input channels in blocks of BLOCK_K."""
    ks = tl.arange(0, BLOCK_K)
    for c0 in range(0, channels, BLOCK_K):
        ci = c0 + ks
        ci_ok = ci < channels
        a = tl.load(a_rows[:, None] + ci[None, :] * xs_c, mask=a_ok[:, None] & ci_ok[None, :], other=0.0)
        b = tl.load(w_tap + channel[None, :] * ws_o + ci[:, None] * ws_i, mask=ci_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _epilogue(acc, keep, channel, col_ok, bias_ptr, sums_row, squares_row, residual_tile, out_ptr, out_offsets,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
              INTERPRETER: tl.constexpr):
    """The forward's epilogue on a tile: bias; the statistics of the output as returned (rounded
    to its dtype, kept entries only) into this tile's row of partials; residual; ReLU; the
    store of the kept entries (`keep`)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STATS:
        value = tl.where(keep, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER).to(tl.float32), 0.0)
        tl.store(sums_row + channel, tl.sum(value, axis=0), mask=col_ok)
        tl.store(squares_row + channel, tl.sum(value * value, axis=0), mask=col_ok)
    if HAS_RESIDUAL:
        acc += tl.load(residual_tile, mask=keep, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + out_offsets, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=keep)


@triton.jit
def _forward_by_pattern_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, mask_ptr, sums_ptr, squares_ptr,
    kept_offsets_ptr, kept_positions_ptr, tile_ends_ptr, segments_ptr,
    batch, rows_per_image, num_patterns, num_segments, out_channels,
    cin_per_group, cout_per_group, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h, ws_w,
    rs_n, rs_c, rs_h, rs_w, os_n, os_c, os_h, os_w, mask_channel_stride,
    KH: tl.constexpr, KW: tl.constexpr, PATTERN_BLOCK: tl.constexpr, ALL_POSITIONS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    segment = tl.program_id(1).to(tl.int64)
    local_tile, position_start, count, group, channel, col_ok = _tile_channels(
        tile, segment, tile_ends_ptr, kept_offsets_ptr, segments_ptr, num_patterns, num_segments, rows_per_image,
        cout_per_group, PATTERN_BLOCK, BLOCK_N)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return

    rows = local_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < batch * count
    image = rows // count
    i = rows % count
    if ALL_POSITIONS:  # every position a row; the mask predicates the stores
        position = i
    else:
        position = tl.load(kept_positions_ptr + position_start + i, mask=row_ok, other=0)
    oh = position // out_width
    ow = position % out_width

    x_image = x_ptr + image * xs_n + (group * cin_per_group) * xs_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        ih = oh * stride_h - pad_h + kh * dilation_h
        iw = ow * stride_w - pad_w + kw * dilation_w
        ok = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        acc = _dot_tap(acc, x_image + ih * xs_h + iw * xs_w, ok, xs_c, w_ptr + kh * ws_h + kw * ws_w, channel,
                       col_ok, cin_per_group, ws_o, ws_i, INTERPRETER, PRECISION, BLOCK_K)

    keep = row_ok[:, None] & col_ok[None, :]
    if ALL_POSITIONS:
        kept = tl.load(mask_ptr + channel[None, :] * mask_channel_stride + position[:, None], mask=keep, other=0)
        keep = keep & (kept != 0)
    _epilogue(acc, keep, channel, col_ok, bias_ptr, sums_ptr + tile * out_channels, squares_ptr + tile * out_channels,
              residual_ptr + image[:, None] * rs_n + channel[None, :] * rs_c + (oh * rs_h + ow * rs_w)[:, None],
              out_ptr, image[:, None] * os_n + channel[None, :] * os_c + (oh * os_h + ow * os_w)[:, None],
              HAS_BIAS, HAS_RESIDUAL, RELU, STATS, INTERPRETER)


@triton.jit
def _forward_by_position_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, sums_ptr, squares_ptr,
    position_offsets_ptr, position_channels_ptr,
    batch, image_blocks, out_channels, in_channels, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h, ws_w,
    rs_n, rs_c, rs_h, rs_w, os_n, os_c, os_h, os_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    position = tl.program_id(0).to(tl.int64)
    image_block = tl.program_id(1).to(tl.int64)
    channel_block = tl.program_id(2).to(tl.int64)
    start = tl.load(position_offsets_ptr + position)
    count = tl.load(position_offsets_ptr + position + 1) - start
    if channel_block * BLOCK_N >= count:
        return
    cols = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < count
    channel = tl.load(position_channels_ptr + start + cols, mask=col_ok, other=0)
    image = image_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = image < batch
    oh = position // out_width
    ow = position % out_width

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        ih = oh * stride_h - pad_h + kh * dilation_h
        iw = ow * stride_w - pad_w + kw * dilation_w
        if (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width):  # padding taps cost nothing
            acc = _dot_tap(acc, x_ptr + image * xs_n + ih * xs_h + iw * xs_w, row_ok, xs_c,
                           w_ptr + kh * ws_h + kw * ws_w, channel, col_ok, in_channels, ws_o, ws_i, INTERPRETER,
                           PRECISION, BLOCK_K)

    keep = row_ok[:, None] & col_ok[None, :]
    partial = (position * image_blocks + image_block) * out_channels
    _epilogue(acc, keep, channel, col_ok, bias_ptr, sums_ptr + partial, squares_ptr + partial,
              residual_ptr + image[:, None] * rs_n + channel[None, :] * rs_c + oh * rs_h + ow * rs_w,
              out_ptr, image[:, None] * os_n + channel[None, :] * os_c + oh * os_h + ow * os_w,
              HAS_BIAS, HAS_RESIDUAL, RELU, STATS, INTERPRETER)


@triton.jit
def _grad_input_kernel(
    grad_output_ptr, w_ptr, mask_ptr, grad_input_ptr,
    batch, height, width, out_height, out_width, cin_per_group, cout_per_group,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    gs_n, gs_c, gs_h, gs_w, ws_o, ws_i, ws_h, ws_w, is_n, is_c, is_h, is_w,
    KH: tl.constexpr, KW: tl.constexpr, MASK_PER_CHANNEL: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    channel_block = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < batch * height * width
    image = rows // (height * width)
    pixel = rows % (height * width)
    ih = pixel // width
    iw = pixel % width
    ci = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < cin_per_group
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        oh_scaled = ih + pad_h - kh * dilation_h
        ow_scaled = iw + pad_w - kw * dilation_w
        oh = oh_scaled // stride_h
        ow = ow_scaled // stride_w
        ok = (row_ok & (oh_scaled >= 0) & (ow_scaled >= 0) & (oh * stride_h == oh_scaled)
              & (ow * stride_w == ow_scaled) & (oh < out_height) & (ow < out_width))
        position = oh * out_width + ow
        if not MASK_PER_CHANNEL:  # one pattern: a masked output position drops the whole row
            kept = tl.load(mask_ptr + position, mask=ok, other=0)
            ok = ok & (kept != 0)
        if tl.max(ok.to(tl.int32), axis=0) > 0:  # no row of the tile reaches a kept output
            go_rows = grad_output_ptr + image * gs_n + oh * gs_h + ow * gs_w
            for c0 in range(0, cout_per_group, BLOCK_K):
                co_ok = (c0 + ks) < cout_per_group
                co = group * cout_per_group + c0 + ks
                load_ok = ok[:, None] & co_ok[None, :]
                if MASK_PER_CHANNEL:
                    kept = tl.load(mask_ptr + co[None, :] * (out_height * out_width) + position[:, None],
                                   mask=load_ok, other=0)
                    load_ok = load_ok & (kept != 0)
                a = tl.load(go_rows[:, None] + co[None, :] * gs_c, mask=load_ok, other=0.0)
                b = tl.load(w_ptr + co[:, None] * ws_o + ci[None, :] * ws_i + kh * ws_h + kw * ws_w,
                            mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
                if INTERPRETER:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

    channel = group * cin_per_group + ci
    tl.store(grad_input_ptr + image[:, None] * is_n + channel[None, :] * is_c + ih[:, None] * is_h + iw[:, None] * is_w,
             _cast(acc, grad_input_ptr.dtype.element_ty, INTERPRETER), mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit
def _grad_input_by_tap_kernel(
    grad_output_ptr, w_ptr, kept_positions_ptr, grad_buffer_ptr,
    batch, count, kh, kw, height, width, out_width, cin_per_group, cout_per_group,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    gs_n, gs_c, gs_h, gs_w, ws_o, ws_i, ws_h, ws_w, is_n, is_c, is_h, is_w,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One pattern (spatial masks), one tap (kh, kw) per launch: grad_input[n, :, ih, iw] +=
    # grad_output[n, :, q] @ w[:, :, kh, kw] over the kept rows (n, q), (ih, iw) = q's tap.
    # For a fixed tap q -> (ih, iw) is injective, so no two programs of a launch touch one
    # pixel, and the launches, in stream order, add up deterministically without atomics.
    row_block = tl.program_id(0).to(tl.int64)
    channel_block = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < batch * count
    image = rows // count
    position = tl.load(kept_positions_ptr + rows % count, mask=row_ok, other=0)
    oh = position // out_width
    ow = position % out_width
    ih = oh * stride_h - pad_h + kh * dilation_h
    iw = ow * stride_w - pad_w + kw * dilation_w
    ok = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    if tl.max(ok.to(tl.int32), axis=0) > 0:  # the tap lands in the padding for every row
        ci = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ci_ok = ci < cin_per_group
        ks = tl.arange(0, BLOCK_K)
        go_rows = grad_output_ptr + image * gs_n + oh * gs_h + ow * gs_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, cout_per_group, BLOCK_K):
            co_ok = (c0 + ks) < cout_per_group
            co = group * cout_per_group + c0 + ks
            a = tl.load(go_rows[:, None] + co[None, :] * gs_c, mask=ok[:, None] & co_ok[None, :], other=0.0)
            b = tl.load(w_ptr + co[:, None] * ws_o + ci[None, :] * ws_i + kh * ws_h + kw * ws_w,
                        mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
            if INTERPRETER:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        channel = group * cin_per_group + ci
        pointers = (grad_buffer_ptr + image[:, None] * is_n + channel[None, :] * is_c + ih[:, None] * is_h
                    + iw[:, None] * is_w)
        store_ok = ok[:, None] & ci_ok[None, :]
        tl.store(pointers, tl.load(pointers, mask=store_ok, other=0.0) + acc, mask=store_ok)


@triton.jit
def _grad_input_by_position_kernel(
    grad_output_ptr, w_ptr, position_offsets_ptr, position_channels_ptr, grad_input_ptr,
    batch, in_channels, height, width, out_height, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    gs_n, gs_c, gs_h, gs_w, ws_o, ws_i, ws_h, ws_w, is_n, is_c, is_h, is_w,
    KH: tl.constexpr, KW: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Gather form, groups == 1: per input pixel, M = images, N = input channels, K = for each
    # tap the output channels kept at the output position it reaches (their grad_output and
    # weight rows gathered), so masked outputs cost nothing.
    pixel = tl.program_id(0).to(tl.int64)
    image_block = tl.program_id(1).to(tl.int64)
    channel_block = tl.program_id(2).to(tl.int64)
    ih = pixel // width
    iw = pixel % width
    image = image_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = image < batch
    ci = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < in_channels
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        oh_scaled = ih + pad_h - kh * dilation_h
        ow_scaled = iw + pad_w - kw * dilation_w
        oh = oh_scaled // stride_h
        ow = ow_scaled // stride_w
        if ((oh_scaled >= 0) & (ow_scaled >= 0) & (oh * stride_h == oh_scaled) & (ow * stride_w == ow_scaled)
                & (oh < out_height) & (ow < out_width)):
            position = oh * out_width + ow
            start = tl.load(position_offsets_ptr + position)
            count = tl.load(position_offsets_ptr + position + 1) - start
            for c0 in range(0, count, BLOCK_K):
                cols = c0 + ks
                c_ok = cols < count
                co = tl.load(position_channels_ptr + start + cols, mask=c_ok, other=0)
                a = tl.load(grad_output_ptr + image[:, None] * gs_n + co[None, :] * gs_c + oh * gs_h + ow * gs_w,
                            mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_ptr + co[:, None] * ws_o + ci[None, :] * ws_i + kh * ws_h + kw * ws_w,
                            mask=c_ok[:, None] & ci_ok[None, :], other=0.0)
                if INTERPRETER:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(grad_input_ptr + image[:, None] * is_n + ci[None, :] * is_c + ih * is_h + iw * is_w,
             _cast(acc, grad_input_ptr.dtype.element_ty, INTERPRETER), mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit
def _grad_weight_pairs_kernel(
    grad_output_ptr, x_ptr, position_offsets_ptr, position_channels_ptr, pairs_ptr,
    batch, reduce_size, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, gs_n, gs_c, gs_h, gs_w,
    KH: tl.constexpr, KW: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sparse grad weight, stage 1 (groups == 1): per output position q, M = the channels kept
    # at q, N = k = (ci, kh, kw), reduced over the images: pairs[pair, k] for each (q, channel)
    # pair of the by-position index (rows position_offsets[q] ...).
    position = tl.program_id(0).to(tl.int64)
    k_block = tl.program_id(1).to(tl.int64)
    slot_block = tl.program_id(2).to(tl.int64)
    start = tl.load(position_offsets_ptr + position)
    count = tl.load(position_offsets_ptr + position + 1) - start
    if slot_block * BLOCK_M >= count:
        return
    slots = slot_block * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < count
    channel = tl.load(position_channels_ptr + start + slots, mask=slot_ok, other=0)
    oh = position // out_width
    ow = position % out_width
    k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < reduce_size
    ci = k // (KH * KW)
    kh = (k % (KH * KW)) // KW
    kw = k % KW
    ih = oh * stride_h - pad_h + kh * dilation_h
    iw = ow * stride_w - pad_w + kw * dilation_w
    k_in = k_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    x_cols = ci * xs_c + ih * xs_h + iw * xs_w
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, batch, BLOCK_N):
        image = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        image_ok = image < batch
        g = tl.load(grad_output_ptr + image[None, :] * gs_n + channel[:, None] * gs_c + oh * gs_h + ow * gs_w,
                    mask=slot_ok[:, None] & image_ok[None, :], other=0.0)
        patch = tl.load(x_ptr + image[:, None] * xs_n + x_cols[None, :], mask=image_ok[:, None] & k_in[None, :],
                        other=0.0)
        if INTERPRETER:
            g = g.to(tl.float32)
            patch = patch.to(tl.float32)
        acc = tl.dot(g, patch, acc, input_precision=PRECISION)
    tl.store(pairs_ptr + (start + slots)[:, None] * reduce_size + k[None, :], acc,
             mask=slot_ok[:, None] & k_ok[None, :])


@triton.jit
def _grad_weight_sum_pairs_kernel(
    pairs_ptr, kept_offsets_ptr, kept_positions_ptr, position_offsets_ptr, position_channels_ptr, grad_weight_ptr,
    channels_per_pattern, reduce_size,
    CHANNEL_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Stage 2: grad_weight[c, k] = the sum of c's pairs' rows, in ascending position order (a
    # fixed order: deterministic). c's positions are its pattern's kept positions; its row at
    # position q is position_offsets[q] + the number of channels kept at q below c.
    channel = tl.program_id(0).to(tl.int64)
    k_block = tl.program_id(1).to(tl.int64)
    pattern = channel // channels_per_pattern
    first = tl.load(kept_offsets_ptr + pattern)
    last = tl.load(kept_offsets_ptr + pattern + 1)
    k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < reduce_size
    lanes = tl.arange(0, CHANNEL_BLOCK)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in range(first, last):
        position = tl.load(kept_positions_ptr + i)
        start = tl.load(position_offsets_ptr + position)
        count = tl.load(position_offsets_ptr + position + 1) - start
        listed = tl.load(position_channels_ptr + start + lanes, mask=lanes < count, other=channel)
        rank = tl.sum((listed < channel).to(tl.int64), axis=0)
        acc += tl.load(pairs_ptr + (start + rank) * reduce_size + k, mask=k_ok, other=0.0)
    tl.store(grad_weight_ptr + channel * reduce_size + k, acc, mask=k_ok)


@triton.jit
def _grad_weight_partial_kernel(
    grad_output_ptr, x_ptr, mask_ptr, partial_ptr,
    kept_offsets_ptr, kept_positions_ptr, tile_ends_ptr, segments_ptr,
    batch, rows_per_image, num_patterns, num_segments, out_channels, reduce_size, chunk_rows,
    cin_per_group, cout_per_group, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, gs_n, gs_c, gs_h, gs_w, mask_channel_stride,
    KH: tl.constexpr, KW: tl.constexpr, PATTERN_BLOCK: tl.constexpr, ALL_POSITIONS: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # partial[chunk, c, k] = sum over the chunk's kept rows (image, position) of
    # grad_output[image, c, position] * patch[image, position, k], k = (ci, kh, kw).
    tile = tl.program_id(0).to(tl.int64)
    segment = tl.program_id(1).to(tl.int64)
    k_block = tl.program_id(2).to(tl.int64)
    local_tile, position_start, count, group, channel, col_ok = _tile_channels(
        tile, segment, tile_ends_ptr, kept_offsets_ptr, segments_ptr, num_patterns, num_segments, rows_per_image,
        cout_per_group, PATTERN_BLOCK, BLOCK_N)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return

    k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < reduce_size
    ci = k // (KH * KW)
    kh = (k % (KH * KW)) // KW
    kw = k % KW
    x_cols = (group * cin_per_group + ci) * xs_c

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_end = tl.minimum((local_tile + 1) * chunk_rows, batch * count)
    for r0 in range(local_tile * chunk_rows, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < row_end
        image = rows // count
        i = rows % count
        if ALL_POSITIONS:
            position = i
        else:
            position = tl.load(kept_positions_ptr + position_start + i, mask=row_ok, other=0)
        oh = position // out_width
        ow = position % out_width
        g_ok = col_ok[:, None] & row_ok[None, :]
        if ALL_POSITIONS:  # grad_output where masked is never read
            kept = tl.load(mask_ptr + channel[:, None] * mask_channel_stride + position[None, :], mask=g_ok, other=0)
            g_ok = g_ok & (kept != 0)
        if tl.max(tl.max(g_ok.to(tl.int32), axis=1), axis=0) > 0:
            g = tl.load(grad_output_ptr + image[None, :] * gs_n + channel[:, None] * gs_c + oh[None, :] * gs_h
                        + ow[None, :] * gs_w, mask=g_ok, other=0.0)
            ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dilation_h
            iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dilation_w
            x_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            patch = tl.load(x_ptr + image[:, None] * xs_n + x_cols[None, :] + ih * xs_h + iw * xs_w,
                            mask=x_ok, other=0.0)
            if INTERPRETER:
                g = g.to(tl.float32)
                patch = patch.to(tl.float32)
            acc = tl.dot(g, patch, acc, input_precision=PRECISION)

    tl.store(partial_ptr + (tile * out_channels + channel[:, None]) * reduce_size + k[None, :], acc,
             mask=col_ok[:, None] & k_ok[None, :])


# -- host launchers ---------------------------------------------------------------------------

class Geometry(NamedTuple):
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


def _check_args(name, input, weight, bias, mask, index, stride, padding, dilation, groups, extra=()):
    """The checks the C++ ops make (csrc/masked_conv2d_common.h) that these kernels rely on."""
    if input.dim() != 4 or weight.dim() != 4:
        raise RuntimeError(f"{name}: input and weight must be 4-D, got shapes {tuple(input.shape)} and "
                           f"{tuple(weight.shape)}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"{name}: the Triton kernels take float32, float16 or bfloat16 input, got {input.dtype}")
    for what, tensor in (("weight", weight), ("bias", bias)) + tuple(extra):
        if tensor is not None and tensor.dtype != input.dtype:
            raise RuntimeError(f"{name}: {what} dtype must match input dtype {input.dtype}, got {tensor.dtype}")
    tensors = (("weight", weight), ("bias", bias), ("mask", mask)) + tuple(extra) + tuple(
        (f"the kept index ({what})", t) for what, t in zip(
            ("kept_offsets", "kept_positions", "position_offsets", "position_channels"), index))
    for what, tensor in tensors:
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(f"{name}: {what} must be on the input's device {input.device}, got {tensor.device}")
    for what, tensor in zip(("kept_offsets", "kept_positions", "position_offsets", "position_channels"), index):
        if tensor.dtype != torch.int64 or tensor.dim() != 1:
            raise RuntimeError(f"{name}: {what} must be a 1-D int64 tensor, got {tensor.dtype} of shape "
                               f"{tuple(tensor.shape)}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2 or min(stride) <= 0 or min(dilation) <= 0 \
            or min(padding) < 0 or groups <= 0:
        raise RuntimeError(f"{name}: bad stride {stride}, padding {padding}, dilation {dilation} or groups {groups}")
    n, cin, h, w = input.shape
    cout, cin_per_group, kh, kw = weight.shape
    if cin != cin_per_group * groups or cout % groups:
        raise RuntimeError(f"{name}: input channels must be weight.size(1) * groups = {cin_per_group * groups} and "
                           f"out channels {cout} divisible by groups {groups}, got {cin} input channels")
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise RuntimeError(f"{name}: output size would be {out_h}x{out_w} for input {h}x{w}: input too small")
    if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] not in (1, cout) \
            or tuple(mask.shape[1:]) != (out_h, out_w):
        raise RuntimeError(f"{name}: mask must be bool of shape ({cout} or 1, {out_h}, {out_w}), got {mask.dtype} "
                           f"of shape {tuple(mask.shape)}")
    patterns = index[0].numel() - 1
    if patterns < 1 or cout % patterns or (mask.shape[0] == 1 and patterns != 1):
        raise RuntimeError(f"{name}: kept_offsets describes {patterns} mask patterns, which must divide the {cout} "
                           "output channels (1 for a (1, H, W) mask)")
    if index[2].numel() != out_h * out_w + 1:
        raise RuntimeError(f"{name}: position_offsets must have Hout * Wout + 1 = {out_h * out_w + 1} entries, "
                           f"got {index[2].numel()}")
    # Sizes only: checking the index's values (offsets ascending, positions in range) would
    # synchronize with the GPU on every call; the index is built once by rk.kept_index.
    if index[1].numel() > patterns * out_h * out_w or index[3].numel() != index[1].numel() * (cout // patterns):
        raise RuntimeError(f"{name}: kept_positions ({index[1].numel()}) and position_channels "
                           f"({index[3].numel()}) must list the same kept outputs: {cout // patterns} channels "
                           "per kept position of each pattern")
    return Geometry(n, cin, h, w, cout, kh, kw, out_h, out_w, groups, patterns)


def _dot_options(dtype):
    # Interpreter: tl.dot on bf16 gives garbage there, so every operand goes up to fp32, and
    # its fp32 -> bf16 conversion truncates, so the kernels round to nearest even themselves.
    # GPU, fp32: strict fp32 unless PyTorch's conv may use TF32 (cudnn.allow_tf32), as F.conv2d.
    if INTERPRET:
        return dict(INTERPRETER=True, PRECISION="ieee")
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return dict(INTERPRETER=False, PRECISION="tf32" if tf32 else "ieee")


@functools.lru_cache(maxsize=256)
def _segments_on(patterns, channels_per_pattern, cout_per_group, block, device):
    """Per pattern, its channels cut at conv-group boundaries and into blocks of `block`:
    (P, J, 2) int64 (first channel, count), padded with count 0; and J."""
    table = []
    for p in range(patterns):
        pieces, channel, end = [], p * channels_per_pattern, (p + 1) * channels_per_pattern
        while channel < end:
            stop = min(end, (channel // cout_per_group + 1) * cout_per_group, channel + block)
            pieces.append((channel, stop - channel))
            channel = stop
        table.append(pieces)
    width = max(len(pieces) for pieces in table)
    flat = [value for pieces in table for piece in pieces + [(0, 0)] * (width - len(pieces)) for value in piece]
    return torch.tensor(flat, dtype=torch.int64, device=device), width


def _tiles(kept_offsets, batch, patterns, rows_per_image, rows_per_tile):
    """Row tiles of every pattern numbered contiguously: (tile_ends, number of programs).
    With P > 1 the count comes from the index on the device, so the grid takes a bound that
    needs no synchronisation: the tiles of all kept rows plus one partial tile per pattern."""
    if patterns == 1:
        return kept_offsets, triton.cdiv(batch * rows_per_image, rows_per_tile)
    counts = kept_offsets[1:] - kept_offsets[:-1]
    ends = torch.cumsum(torch.div(counts * batch + rows_per_tile - 1, rows_per_tile, rounding_mode="floor"), 0)
    return ends, triton.cdiv(batch * rows_per_image, rows_per_tile) + patterns


def _pattern_block(patterns):
    return 1 if patterns == 1 else triton.next_power_of_2(patterns)


def _forward_variant(geometry):
    if geometry.channels_per_pattern >= MIN_PATTERN_CHANNELS:
        return "by_pattern"
    if geometry.groups == 1:
        return "by_position"
    # Few channels per pattern and groups > 1: one pattern of all positions, the stores
    # predicated on the mask (the by-position gather would mix conv groups in one tile).
    return "all_positions"


def masked_conv2d_forward(input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                          position_channels, stride, padding, dilation, groups, residual=None, relu=False,
                          channel_stats=False):
    """relu?(mask * (conv + bias) + residual) and, with channel_stats, the float64 sum and sum of
    squares per channel of the (kept) outputs: (output, sums, squares); empty sums without."""
    index = (kept_offsets, kept_positions, position_offsets, position_channels)
    extra = (("residual", residual),) if residual is not None else ()
    geometry = _check_args("triton_masked_conv2d", input, weight, bias, mask, index, stride, padding, dilation,
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
    bias_arg = bias.contiguous() if bias is not None else output
    residual_arg = residual if residual is not None else output
    common = dict(
        KH=geometry.kernel_h, KW=geometry.kernel_w, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=bool(relu), STATS=bool(channel_stats), num_warps=NUM_WARPS, **_dot_options(input.dtype),
    )
    conv = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    strides = (*input.stride(), *weight.stride(), *residual_arg.stride(), *output.stride())

    variant = _forward_variant(geometry)
    if variant == "by_position":
        # M = the batch, N = the channels kept per position (on average: the index's size
        # tells without a sync), each at least tl.dot's 16.
        positions = geometry.out_height * geometry.out_width
        block_m = min(BLOCK_M, max(16, triton.next_power_of_2(geometry.batch)))
        block_n = min(BLOCK_N, max(16, triton.next_power_of_2(triton.cdiv(position_channels.numel(), positions))))
        image_blocks = triton.cdiv(geometry.batch, block_m)
        grid = (positions, image_blocks, triton.cdiv(geometry.out_channels, block_n))
        partial_rows = grid[0] * image_blocks
        partial_sums, partial_squares = _partials(channel_stats, partial_rows, geometry.out_channels, input.device)
        _forward_by_position_kernel[grid](
            input, weight, bias_arg, residual_arg, output, partial_sums, partial_squares,
            position_offsets, position_channels,
            geometry.batch, image_blocks, geometry.out_channels, geometry.in_channels, geometry.height,
            geometry.width, geometry.out_width, *conv, *strides,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, **common,
        )
    else:
        all_positions = variant == "all_positions"
        patterns = 1 if all_positions else geometry.patterns
        positions = geometry.out_height * geometry.out_width
        rows_per_image = positions if all_positions else kept_positions.numel()
        tile_ends, tiles = _tiles(kept_offsets, geometry.batch, patterns, rows_per_image, BLOCK_M)
        segments, num_segments = _segments_on(
            patterns, geometry.out_channels // patterns, geometry.cout_per_group, BLOCK_N, str(input.device))
        partial_sums, partial_squares = _partials(channel_stats, tiles, geometry.out_channels, input.device)
        mask_arg = mask.contiguous().view(torch.uint8)
        _forward_by_pattern_kernel[(tiles, num_segments)](
            input, weight, bias_arg, residual_arg, output, mask_arg, partial_sums, partial_squares,
            kept_offsets, kept_positions, tile_ends, segments,
            geometry.batch, rows_per_image, patterns, num_segments, geometry.out_channels,
            geometry.cin_per_group, geometry.cout_per_group, geometry.height, geometry.width, geometry.out_width,
            *conv, *strides, positions if mask.shape[0] > 1 else 0,
            PATTERN_BLOCK=_pattern_block(patterns), ALL_POSITIONS=all_positions,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **common,
        )
    if channel_stats:
        # fp32 partials per tile, then one float64 sum over the tiles in a fixed order.
        sums = partial_sums.double().sum(0)
        squares = partial_squares.double().sum(0)
    return output, sums, squares


def _partials(wanted, rows, channels, device):
    if not wanted:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty
    return (torch.zeros(rows, channels, dtype=torch.float32, device=device),
            torch.zeros(rows, channels, dtype=torch.float32, device=device))


def masked_conv2d_backward(grad_output, input, weight, mask, kept_offsets, kept_positions, position_offsets,
                           position_channels, stride, padding, dilation, groups, output_mask):
    """Gradients (input, weight, bias) of mask * conv(input, weight) + bias; grad_output where
    the mask is False is ignored. An output not asked for in output_mask is an empty tensor."""
    index = (kept_offsets, kept_positions, position_offsets, position_channels)
    geometry = _check_args("triton_masked_conv2d_backward", input, weight, None, mask, index, stride, padding,
                           dilation, groups, (("grad_output", grad_output),))
    shape = (geometry.batch, geometry.out_channels, geometry.out_height, geometry.out_width)
    if tuple(grad_output.shape) != shape:
        raise RuntimeError(f"triton_masked_conv2d_backward: grad_output must have the output's shape {shape}, "
                           f"got {tuple(grad_output.shape)}")
    empty = input.new_empty(0)
    grad_input = grad_weight = grad_bias = empty
    options = dict(num_warps=NUM_WARPS, **_dot_options(input.dtype))
    conv = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    mask_arg = mask.contiguous().view(torch.uint8)
    nothing_kept = kept_positions.numel() == 0 or geometry.batch == 0

    if output_mask[0]:
        memory_format = torch._prims_common.suggest_memory_format(input)
        positions = geometry.out_height * geometry.out_width
        sparse = kept_positions.numel() <= SPARSE_BACKWARD_MAX_KEEP * positions * geometry.patterns
        by_tap = sparse and geometry.patterns == 1
        by_position = sparse and geometry.groups == 1 and geometry.channels_per_pattern < MIN_PATTERN_CHANNELS
        if nothing_kept:
            grad_input = torch.zeros_like(input, memory_format=memory_format)
        elif by_position:
            grad_input = torch.empty_like(input, memory_format=memory_format)
            block_m = min(BLOCK_M, max(16, triton.next_power_of_2(geometry.batch)))
            block_k = min(BLOCK_K, max(16, triton.next_power_of_2(triton.cdiv(position_channels.numel(), positions))))
            grid = (geometry.height * geometry.width, triton.cdiv(geometry.batch, block_m),
                    triton.cdiv(geometry.in_channels, BLOCK_N))
            _grad_input_by_position_kernel[grid](
                grad_output, weight, position_offsets.contiguous(), position_channels.contiguous(), grad_input,
                geometry.batch, geometry.in_channels, geometry.height, geometry.width, geometry.out_height,
                geometry.out_width, *conv, *grad_output.stride(), *weight.stride(), *grad_input.stride(),
                KH=geometry.kernel_h, KW=geometry.kernel_w,
                BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, **options,
            )
        elif by_tap:
            grad_input = torch.zeros_like(input, dtype=torch.float32, memory_format=memory_format)
            count = kept_positions.numel()
            grid = (triton.cdiv(geometry.batch * count, BLOCK_M), triton.cdiv(geometry.cin_per_group, BLOCK_N),
                    geometry.groups)
            for kh in range(geometry.kernel_h):
                for kw in range(geometry.kernel_w):
                    _grad_input_by_tap_kernel[grid](
                        grad_output, weight, kept_positions.contiguous(), grad_input,
                        geometry.batch, count, kh, kw, geometry.height, geometry.width, geometry.out_width,
                        geometry.cin_per_group, geometry.cout_per_group, *conv,
                        *grad_output.stride(), *weight.stride(), *grad_input.stride(),
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **options,
                    )
            grad_input = grad_input.to(input.dtype)
        else:
            grad_input = torch.empty_like(input, memory_format=memory_format)
            rows = geometry.batch * geometry.height * geometry.width
            grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(geometry.cin_per_group, BLOCK_N), geometry.groups)
            _grad_input_kernel[grid](
                grad_output, weight, mask_arg, grad_input,
                geometry.batch, geometry.height, geometry.width, geometry.out_height, geometry.out_width,
                geometry.cin_per_group, geometry.cout_per_group, *conv,
                *grad_output.stride(), *weight.stride(), *grad_input.stride(),
                KH=geometry.kernel_h, KW=geometry.kernel_w, MASK_PER_CHANNEL=mask.shape[0] > 1,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **options,
            )

    if output_mask[1]:
        reduce_size = geometry.cin_per_group * geometry.kernel_h * geometry.kernel_w
        pairs = position_channels.numel()
        positions = geometry.out_height * geometry.out_width
        sparse_pairs = (geometry.groups == 1 and geometry.channels_per_pattern < MIN_PATTERN_CHANNELS
                        and pairs <= SPARSE_BACKWARD_MAX_KEEP * positions * geometry.out_channels
                        and 4 * pairs * reduce_size <= PARTIAL_BUDGET_BYTES)
        if nothing_kept:
            grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        elif sparse_pairs:
            pair_rows = torch.empty(pairs, reduce_size, dtype=torch.float32, device=input.device)
            block_m = min(BLOCK_N, max(16, triton.next_power_of_2(triton.cdiv(pairs, positions))))
            block_images = min(BLOCK_M, max(16, triton.next_power_of_2(geometry.batch)))
            grid = (positions, triton.cdiv(reduce_size, BLOCK_K), triton.cdiv(geometry.out_channels, block_m))
            _grad_weight_pairs_kernel[grid](
                grad_output, input, position_offsets.contiguous(), position_channels.contiguous(), pair_rows,
                geometry.batch, reduce_size, geometry.height, geometry.width, geometry.out_width, *conv,
                *input.stride(), *grad_output.stride(), KH=geometry.kernel_h, KW=geometry.kernel_w,
                BLOCK_M=block_m, BLOCK_N=block_images, BLOCK_K=BLOCK_K, **options,
            )
            grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=input.device)
            _grad_weight_sum_pairs_kernel[(geometry.out_channels, triton.cdiv(reduce_size, BLOCK_K))](
                pair_rows, kept_offsets.contiguous(), kept_positions.contiguous(), position_offsets.contiguous(),
                position_channels.contiguous(), grad_weight, geometry.channels_per_pattern, reduce_size,
                CHANNEL_BLOCK=triton.next_power_of_2(geometry.out_channels), BLOCK_K=BLOCK_K,
                num_warps=NUM_WARPS,
            )
            grad_weight = grad_weight.to(weight.dtype)
        else:
            # Pattern rows as in the forward; few channels per pattern: every position a row,
            # grad_output read only where kept (a tile of a pattern's channels would be mostly empty).
            all_positions = geometry.channels_per_pattern < MIN_PATTERN_CHANNELS
            patterns = 1 if all_positions else geometry.patterns
            rows_per_image = positions if all_positions else kept_positions.numel()
            # Chunks of a multiple of BLOCK_M rows, at least WEIGHT_CHUNK, few enough that
            # the partials fit PARTIAL_BUDGET_BYTES.
            max_chunks = max(1, PARTIAL_BUDGET_BYTES // (4 * geometry.out_channels * reduce_size) - patterns)
            chunk_rows = max(WEIGHT_CHUNK, triton.cdiv(geometry.batch * rows_per_image, max_chunks))
            chunk_rows = triton.cdiv(chunk_rows, BLOCK_M) * BLOCK_M
            tile_ends, tiles = _tiles(kept_offsets.contiguous(), geometry.batch, patterns, rows_per_image,
                                      chunk_rows)
            segments, num_segments = _segments_on(
                patterns, geometry.out_channels // patterns, geometry.cout_per_group, BLOCK_N, str(input.device))
            partial = torch.zeros(tiles, geometry.out_channels, reduce_size, dtype=torch.float32, device=input.device)
            grid = (tiles, num_segments, triton.cdiv(reduce_size, BLOCK_K))
            _grad_weight_partial_kernel[grid](
                grad_output, input, mask_arg, partial,
                kept_offsets.contiguous(), kept_positions.contiguous(), tile_ends, segments,
                geometry.batch, rows_per_image, patterns, num_segments, geometry.out_channels, reduce_size,
                chunk_rows, geometry.cin_per_group, geometry.cout_per_group, geometry.height, geometry.width,
                geometry.out_width, *conv, *input.stride(), *grad_output.stride(),
                positions if mask.shape[0] > 1 else 0,
                KH=geometry.kernel_h, KW=geometry.kernel_w, PATTERN_BLOCK=_pattern_block(patterns),
                ALL_POSITIONS=all_positions,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **options,
            )
            # Second stage: the chunks' fp32 partials summed in a fixed order.
            grad_weight = partial.sum(0).view(weight.shape).to(weight.dtype)

    if output_mask[2]:
        # A plain reduction (deterministic, fp32 accumulation) over the kept positions only.
        kept_grad = torch.where(mask, grad_output, torch.zeros((), dtype=grad_output.dtype, device=input.device))
        grad_bias = kept_grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(input.dtype)
    return grad_input, grad_weight, grad_bias
