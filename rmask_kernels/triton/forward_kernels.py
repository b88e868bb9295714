"""The forward kernels of the masked convolution: implicit GEMMs whose input rows are loaded by
computed addresses (strides passed in, bounds masks for the padding), accumulating in fp32 and
computing kept outputs only (host launcher: forward.py).

by pattern   per mask pattern p (P patterns of channels_per_pattern channels each):
             M = (image, kept position of p), N = p's channels (cut at conv-group boundaries),
             K = (tap, input channel of the group). ALL_POSITIONS: one pattern of every
             position, the stores predicated on the mask.
by position  per output position q, M = images, N = the channels kept at q (weight rows
             gathered), K = (tap, input channel); groups == 1.

Strides are passed per tensor and dimension: xs_* of the input, ws_* of the weight, rs_* of
the residual, os_* of the output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cast
from .tiles import tile_channels


@triton.jit
def _dot_tap(acc, x_ptr, a_rows, a_ok, xs_c, w_ptr, b_cols, col_ok, channels, ws_i,
             INTERPRETER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += input rows (a_rows: the offset of each row's pixel of this tap at its group's first
    channel, a_ok: inside the image) times the tap's weights (b_cols: the offset of each column's
    weights of this tap), over `channels` input channels in blocks of BLOCK_K. The offset tiles
    are built once and advanced by a block per step, as in a plain GEMM."""
    ks = tl.arange(0, BLOCK_K)
    a_offsets = a_rows[:, None] + ks[None, :] * xs_c
    b_offsets = b_cols[None, :] + ks[:, None] * ws_i
    for c0 in range(0, channels, BLOCK_K):
        ci_ok = ks < channels - c0
        a = tl.load(x_ptr + a_offsets, mask=a_ok[:, None] & ci_ok[None, :], other=0.0)
        b = tl.load(w_ptr + b_offsets, mask=ci_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_offsets += BLOCK_K * xs_c
        b_offsets += BLOCK_K * ws_i
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
        value = tl.where(keep, cast(acc, out_ptr.dtype.element_ty, INTERPRETER).to(tl.float32), 0.0)
        tl.store(sums_row + channel, tl.sum(value, axis=0), mask=col_ok)
        tl.store(squares_row + channel, tl.sum(value * value, axis=0), mask=col_ok)
    if HAS_RESIDUAL:
        acc += tl.load(residual_tile, mask=keep, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + out_offsets, cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=keep)


@triton.jit
def forward_by_pattern_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, mask_ptr, sums_ptr, squares_ptr,
    kept_offsets_ptr, kept_positions_ptr, tile_ends_ptr, segments_ptr,
    batch, rows_per_image, num_patterns, num_segments, out_channels,
    cin_per_group, cout_per_group, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h, ws_w,
    rs_n, rs_c, rs_h, rs_w, os_n, os_c, os_h, os_w, mask_channel_stride,
    KH: tl.constexpr, KW: tl.constexpr, PATTERN_BLOCK: tl.constexpr, ALL_POSITIONS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    INDEX: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0).to(INDEX)
    segment = tl.program_id(1).to(INDEX)
    local_tile, position_start, count, group, channel, col_ok = tile_channels(
        tile, segment, tile_ends_ptr, kept_offsets_ptr, segments_ptr, num_patterns, num_segments, rows_per_image,
        cout_per_group, PATTERN_BLOCK, BLOCK_N)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return
    count = count.to(INDEX)
    group = group.to(INDEX)
    channel = channel.to(INDEX)

    rows = local_tile.to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < batch * count
    image = rows // count
    i = rows % count
    if ALL_POSITIONS:  # every position a row; the mask predicates the stores
        position = i
    else:
        position = tl.load(kept_positions_ptr + position_start + i, mask=row_ok, other=0).to(INDEX)
    oh = position // out_width
    ow = position % out_width

    # Per row and per column, what no tap changes; each tap adds its own terms.
    x_rows = image * xs_n + (group * cin_per_group) * xs_c
    w_cols = channel * ws_o
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        ih = oh * stride_h - pad_h + kh * dilation_h
        iw = ow * stride_w - pad_w + kw * dilation_w
        ok = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        acc = _dot_tap(acc, x_ptr, x_rows + ih * xs_h + iw * xs_w, ok, xs_c, w_ptr, w_cols + kh * ws_h + kw * ws_w,
                       col_ok, cin_per_group, ws_i, INTERPRETER, PRECISION, BLOCK_K)

    keep = row_ok[:, None] & col_ok[None, :]
    if ALL_POSITIONS:
        kept = tl.load(mask_ptr + (channel[None, :] * mask_channel_stride + position[:, None]), mask=keep, other=0)
        keep = keep & (kept != 0)
    _epilogue(acc, keep, channel, col_ok, bias_ptr, sums_ptr + tile * out_channels, squares_ptr + tile * out_channels,
              residual_ptr + ((image * rs_n + oh * rs_h + ow * rs_w)[:, None] + channel[None, :] * rs_c),
              out_ptr, (image * os_n + oh * os_h + ow * os_w)[:, None] + channel[None, :] * os_c,
              HAS_BIAS, HAS_RESIDUAL, RELU, STATS, INTERPRETER)


@triton.jit
def forward_by_position_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, sums_ptr, squares_ptr,
    position_offsets_ptr, position_channels_ptr,
    batch, image_blocks, out_channels, in_channels, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h, ws_w,
    rs_n, rs_c, rs_h, rs_w, os_n, os_c, os_h, os_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    INDEX: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    position = tl.program_id(0).to(INDEX)
    image_block = tl.program_id(1).to(INDEX)
    channel_block = tl.program_id(2).to(INDEX)
    start = tl.load(position_offsets_ptr + position)
    count = (tl.load(position_offsets_ptr + position + 1) - start).to(INDEX)
    if channel_block * BLOCK_N >= count:
        return
    cols = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < count
    channel = tl.load(position_channels_ptr + start + cols, mask=col_ok, other=0).to(INDEX)
    image = image_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = image < batch
    oh = position // out_width
    ow = position % out_width

    x_rows = image * xs_n
    w_cols = channel * ws_o
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        ih = oh * stride_h - pad_h + kh * dilation_h
        iw = ow * stride_w - pad_w + kw * dilation_w
        inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        # A padding tap reads nothing: its channel loop is empty.
        acc = _dot_tap(acc, x_ptr, x_rows + (ih * xs_h + iw * xs_w), row_ok, xs_c, w_ptr,
                       w_cols + (kh * ws_h + kw * ws_w), col_ok, tl.where(inside, in_channels, 0), ws_i, INTERPRETER,
                       PRECISION, BLOCK_K)

    keep = row_ok[:, None] & col_ok[None, :]
    partial = (position * image_blocks + image_block) * out_channels
    _epilogue(acc, keep, channel, col_ok, bias_ptr, sums_ptr + partial, squares_ptr + partial,
              residual_ptr + ((image * rs_n + (oh * rs_h + ow * rs_w))[:, None] + channel[None, :] * rs_c),
              out_ptr, (image * os_n + (oh * os_h + ow * os_w))[:, None] + channel[None, :] * os_c,
              HAS_BIAS, HAS_RESIDUAL, RELU, STATS, INTERPRETER)
