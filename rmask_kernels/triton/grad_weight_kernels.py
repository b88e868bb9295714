"""The grad-weight kernels of the masked convolution (host launcher: backward.py). Each has two
stages whose fp32 partials are summed in a fixed order (deterministic, no atomics):

partials   chunks of kept rows (by pattern, tiles.py) each give a partial grad weight, summed
           over the chunks on the host. Neuron-like masks: chunks of every row, grad_output
           read only where kept.
pairs      sparse neuron-like masks, groups == 1: per (position, kept channel) pair a row
           reduced over the images, then per channel its pairs' rows summed in position order.

Strides are passed per tensor and dimension: xs_* of the input, gs_* of grad_output, rs_* of
the gate (gate_ptr: a fused ReLU's output, read where grad_output is when GATED; grad_output's
gradient counts only where it is > 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import load_gradient
from .tiles import tile_channels


@triton.jit
def grad_weight_pairs_kernel(
    grad_output_ptr, x_ptr, position_offsets_ptr, position_channels_ptr, pairs_ptr,
    batch, reduce_size, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, gs_n, gs_c, gs_h, gs_w, gate_ptr, rs_n, rs_c, rs_h, rs_w,
    KH: tl.constexpr, KW: tl.constexpr, GATED: tl.constexpr, INDEX: tl.constexpr, INTERPRETER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sparse grad weight, stage 1 (groups == 1): per output position q, M = the channels kept
    # at q, N = k = (ci, kh, kw), reduced over the images: pairs[pair, k] for each (q, channel)
    # pair of the by-position index (rows position_offsets[q] ...).
    position = tl.program_id(0).to(INDEX)
    k_block = tl.program_id(1).to(INDEX)
    slot_block = tl.program_id(2).to(INDEX)
    start = tl.load(position_offsets_ptr + position)
    count = tl.load(position_offsets_ptr + position + 1) - start
    if slot_block * BLOCK_M >= count:
        return
    slots = slot_block * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < count
    channel = tl.load(position_channels_ptr + start + slots, mask=slot_ok, other=0).to(INDEX)
    oh = position // out_width
    ow = position % out_width
    k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < reduce_size
    ci = k // (KH * KW)
    kh = (k % (KH * KW)) // KW
    kw = k % KW
    ih = oh * stride_h - pad_h + kh * dilation_h
    iw = ow * stride_w - pad_w + kw * dilation_w
    k_inside = k_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    x_cols = ci * xs_c + ih * xs_h + iw * xs_w
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, batch, BLOCK_N):
        image = (n0 + tl.arange(0, BLOCK_N)).to(INDEX)
        image_ok = image < batch
        grad = load_gradient(grad_output_ptr + image[None, :] * gs_n + channel[:, None] * gs_c + oh * gs_h + ow * gs_w,
                             gate_ptr + image[None, :] * rs_n + channel[:, None] * rs_c + oh * rs_h + ow * rs_w,
                             slot_ok[:, None] & image_ok[None, :], GATED)
        patch = tl.load(x_ptr + image[:, None] * xs_n + x_cols[None, :], mask=image_ok[:, None] & k_inside[None, :],
                        other=0.0)
        if INTERPRETER:
            grad = grad.to(tl.float32)
            patch = patch.to(tl.float32)
        acc = tl.dot(grad, patch, acc, input_precision=PRECISION)
    tl.store(pairs_ptr + (start + slots)[:, None] * reduce_size + k[None, :], acc,
             mask=slot_ok[:, None] & k_ok[None, :])


@triton.jit
def grad_weight_sum_pairs_kernel(
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
def grad_weight_partial_kernel(
    grad_output_ptr, x_ptr, mask_ptr, partial_ptr,
    kept_offsets_ptr, kept_positions_ptr, tile_ends_ptr, segments_ptr,
    batch, rows_per_image, num_patterns, num_segments, out_channels, reduce_size, chunk_rows,
    cin_per_group, cout_per_group, height, width, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    xs_n, xs_c, xs_h, xs_w, gs_n, gs_c, gs_h, gs_w, gate_ptr, rs_n, rs_c, rs_h, rs_w, mask_channel_stride,
    KH: tl.constexpr, KW: tl.constexpr, PATTERN_BLOCK: tl.constexpr, ALL_POSITIONS: tl.constexpr,
    GATED: tl.constexpr, INDEX: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # partial[chunk, c, k] = sum over the chunk's kept rows (image, position) of
    # grad_output[image, c, position] * patch[image, position, k], k = (ci, kh, kw).
    tile = tl.program_id(0).to(INDEX)
    segment = tl.program_id(1).to(INDEX)
    k_block = tl.program_id(2).to(INDEX)
    local_tile, position_start, count, group, channel, col_ok = tile_channels(
        tile, segment, tile_ends_ptr, kept_offsets_ptr, segments_ptr, num_patterns, num_segments, rows_per_image,
        cout_per_group, PATTERN_BLOCK, BLOCK_N)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return
    local_tile = local_tile.to(INDEX)
    count = count.to(INDEX)
    group = group.to(INDEX)
    channel = channel.to(INDEX)

    # Per column k what no row changes: its offset in the input and its tap's displacement.
    k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < reduce_size
    ci = k // (KH * KW)
    kh = (k % (KH * KW)) // KW
    kw = k % KW
    h_shift = kh * dilation_h - pad_h
    w_shift = kw * dilation_w - pad_w
    x_cols = (group * cin_per_group + ci) * xs_c + h_shift * xs_h + w_shift * xs_w

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_end = tl.minimum((local_tile + 1) * chunk_rows, batch * count)
    for r0 in range(local_tile * chunk_rows, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        image = rows // count
        i = rows % count
        if ALL_POSITIONS:
            position = i
        else:
            position = tl.load(kept_positions_ptr + position_start + i, mask=row_ok, other=0).to(INDEX)
        oh = position // out_width
        ow = position % out_width
        grad_ok = col_ok[:, None] & row_ok[None, :]
        if ALL_POSITIONS:  # grad_output where masked is never read
            kept = tl.load(mask_ptr + (channel[:, None] * mask_channel_stride + position[None, :]), mask=grad_ok,
                           other=0)
            grad_ok = grad_ok & (kept != 0)
        if tl.max(tl.max(grad_ok.to(tl.int32), axis=1), axis=0) > 0:
            grad_cols = image * gs_n + oh * gs_h + ow * gs_w
            gate_cols = image * rs_n + oh * rs_h + ow * rs_w
            grad = load_gradient(grad_output_ptr + (channel[:, None] * gs_c + grad_cols[None, :]),
                                 gate_ptr + (channel[:, None] * rs_c + gate_cols[None, :]), grad_ok, GATED)
            ih0 = oh * stride_h
            iw0 = ow * stride_w
            ih = ih0[:, None] + h_shift[None, :]
            iw = iw0[:, None] + w_shift[None, :]
            x_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            patch = tl.load(x_ptr + ((image * xs_n + ih0 * xs_h + iw0 * xs_w)[:, None] + x_cols[None, :]),
                            mask=x_ok, other=0.0)
            if INTERPRETER:
                grad = grad.to(tl.float32)
                patch = patch.to(tl.float32)
            acc = tl.dot(grad, patch, acc, input_precision=PRECISION)

    tl.store(partial_ptr + ((tile * out_channels + channel[:, None]) * reduce_size + k[None, :]), acc,
             mask=col_ok[:, None] & k_ok[None, :])
