"""The grad-input kernels of the masked convolution (host launcher: backward.py), each an
implicit GEMM accumulating in fp32:

gather       M = input pixels, N = input channels, K = (tap, output channel); grad_output is
             loaded only where the mask keeps it. Dense FLOPs, one pass.
by tap       spatial masks (one pattern): M = kept rows, one launch per tap adding into an
             fp32 buffer.
by position  neuron-like masks, groups == 1: per input pixel, K = the channels kept where each
             tap lands.

Strides are passed per tensor and dimension: gs_* of grad_output, ws_* of the weight, is_* of
the grad input, rs_* of the gate (gate_ptr: a fused ReLU's output, read where grad_output is
when GATED; grad_output's gradient counts only where it is > 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cast, load_gradient


@triton.jit
def _dot_output_channels(acc, grad_output_ptr, gate_ptr, w_ptr, mask_ptr, g_rows, r_rows, ok, position, w_cols,
                         ci_ok, first_channel, cout_per_group, gs_c, rs_c, ws_o, mask_channel_stride,
                         MASK_PER_CHANNEL: tl.constexpr, GATED: tl.constexpr, INTERPRETER: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += grad_output rows (g_rows, r_rows: each row's offset in grad_output and the gate at
    channel 0, ok: the row reaches a kept output) times the weights of the output channels
    first_channel ... + cout_per_group (w_cols: each column's offset at output channel 0 and
    this tap), in blocks of BLOCK_K. MASK_PER_CHANNEL: grad_output read only where the mask at
    (channel, position) keeps it. The offset tiles are built once and advanced by a block per step."""
    ks = tl.arange(0, BLOCK_K)
    co = first_channel + ks
    g_offsets = g_rows[:, None] + co[None, :] * gs_c
    r_offsets = r_rows[:, None] + co[None, :] * rs_c
    b_offsets = co[:, None] * ws_o + w_cols[None, :]
    m_offsets = co[None, :] * mask_channel_stride + position[:, None]
    for c0 in range(0, cout_per_group, BLOCK_K):
        co_ok = ks < cout_per_group - c0
        load_ok = ok[:, None] & co_ok[None, :]
        if MASK_PER_CHANNEL:
            kept = tl.load(mask_ptr + m_offsets, mask=load_ok, other=0)
            load_ok = load_ok & (kept != 0)
        a = load_gradient(grad_output_ptr + g_offsets, gate_ptr + r_offsets, load_ok, GATED)
        b = tl.load(w_ptr + b_offsets, mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        g_offsets += BLOCK_K * gs_c
        r_offsets += BLOCK_K * rs_c
        b_offsets += BLOCK_K * ws_o
        m_offsets += BLOCK_K * mask_channel_stride
    return acc


@triton.jit
def grad_input_gather_kernel(
    grad_output_ptr, w_ptr, mask_ptr, grad_input_ptr,
    batch, height, width, out_height, out_width, cin_per_group, cout_per_group,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    gs_n, gs_c, gs_h, gs_w, gate_ptr, rs_n, rs_c, rs_h, rs_w, ws_o, ws_i, ws_h, ws_w, is_n, is_c, is_h, is_w,
    KH: tl.constexpr, KW: tl.constexpr, MASK_PER_CHANNEL: tl.constexpr, GATED: tl.constexpr,
    INDEX: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row_block = tl.program_id(0).to(INDEX)
    channel_block = tl.program_id(1).to(INDEX)
    group = tl.program_id(2).to(INDEX)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < batch * height * width
    image = rows // (height * width)
    pixel = rows % (height * width)
    ih = pixel // width
    iw = pixel % width
    ci = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < cin_per_group
    first_channel = group * cout_per_group
    w_cols = ci * ws_i

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
            acc = _dot_output_channels(
                acc, grad_output_ptr, gate_ptr, w_ptr, mask_ptr, image * gs_n + oh * gs_h + ow * gs_w,
                image * rs_n + oh * rs_h + ow * rs_w, ok, position, w_cols + (kh * ws_h + kw * ws_w), ci_ok,
                first_channel, cout_per_group, gs_c, rs_c, ws_o, out_height * out_width, MASK_PER_CHANNEL, GATED,
                INTERPRETER, PRECISION, BLOCK_K)

    channel = group * cin_per_group + ci
    tl.store(grad_input_ptr + ((image * is_n + ih * is_h + iw * is_w)[:, None] + channel[None, :] * is_c),
             cast(acc, grad_input_ptr.dtype.element_ty, INTERPRETER), mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit
def grad_input_by_tap_kernel(
    grad_output_ptr, w_ptr, kept_positions_ptr, grad_buffer_ptr,
    batch, count, kh, kw, height, width, out_width, cin_per_group, cout_per_group,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    gs_n, gs_c, gs_h, gs_w, gate_ptr, rs_n, rs_c, rs_h, rs_w, ws_o, ws_i, ws_h, ws_w, is_n, is_c, is_h, is_w,
    GATED: tl.constexpr, INDEX: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One pattern (spatial masks), one tap (kh, kw) per launch: grad_input[n, :, ih, iw] +=
    # grad_output[n, :, q] @ w[:, :, kh, kw] over the kept rows (n, q), (ih, iw) = q's tap.
    # For a fixed tap q -> (ih, iw) is injective, so no two programs of a launch touch one
    # pixel, and the launches, in stream order, add up deterministically without atomics.
    row_block = tl.program_id(0).to(INDEX)
    channel_block = tl.program_id(1).to(INDEX)
    group = tl.program_id(2).to(INDEX)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < batch * count
    image = rows // count
    position = tl.load(kept_positions_ptr + rows % count, mask=row_ok, other=0).to(INDEX)
    oh = position // out_width
    ow = position % out_width
    ih = oh * stride_h - pad_h + kh * dilation_h
    iw = ow * stride_w - pad_w + kw * dilation_w
    ok = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    if tl.max(ok.to(tl.int32), axis=0) > 0:  # the tap lands in the padding for every row
        ci = channel_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ci_ok = ci < cin_per_group
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dot_output_channels(
            acc, grad_output_ptr, gate_ptr, w_ptr, grad_buffer_ptr, image * gs_n + oh * gs_h + ow * gs_w,
            image * rs_n + oh * rs_h + ow * rs_w, ok, position, ci * ws_i + (kh * ws_h + kw * ws_w), ci_ok,
            group * cout_per_group, cout_per_group, gs_c, rs_c, ws_o, 0, False, GATED, INTERPRETER, PRECISION,
            BLOCK_K)
        channel = group * cin_per_group + ci
        pointers = grad_buffer_ptr + ((image * is_n + ih * is_h + iw * is_w)[:, None] + channel[None, :] * is_c)
        store_ok = ok[:, None] & ci_ok[None, :]
        tl.store(pointers, tl.load(pointers, mask=store_ok, other=0.0) + acc, mask=store_ok)


@triton.jit
def grad_input_by_position_kernel(
    grad_output_ptr, w_ptr, position_offsets_ptr, position_channels_ptr, grad_input_ptr,
    batch, in_channels, height, width, out_height, out_width,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    gs_n, gs_c, gs_h, gs_w, gate_ptr, rs_n, rs_c, rs_h, rs_w, ws_o, ws_i, ws_h, ws_w, is_n, is_c, is_h, is_w,
    KH: tl.constexpr, KW: tl.constexpr, GATED: tl.constexpr, INDEX: tl.constexpr, INTERPRETER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Gather form, groups == 1: per input pixel, M = images, N = input channels, K = for each
    # tap the output channels kept at the output position it reaches (their grad_output and
    # weight rows gathered), so masked outputs cost nothing.
    pixel = tl.program_id(0).to(INDEX)
    image_block = tl.program_id(1).to(INDEX)
    channel_block = tl.program_id(2).to(INDEX)
    ih = pixel // width
    iw = pixel % width
    image = image_block * BLOCK_M + tl.arange(0, BLOCK_M)
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
                cols_ok = cols < count
                co = tl.load(position_channels_ptr + start + cols, mask=cols_ok, other=0).to(INDEX)
                a = load_gradient(grad_output_ptr + image[:, None] * gs_n + co[None, :] * gs_c + oh * gs_h + ow * gs_w,
                                  gate_ptr + image[:, None] * rs_n + co[None, :] * rs_c + oh * rs_h + ow * rs_w,
                                  row_ok[:, None] & cols_ok[None, :], GATED)
                b = tl.load(w_ptr + co[:, None] * ws_o + ci[None, :] * ws_i + kh * ws_h + kw * ws_w,
                            mask=cols_ok[:, None] & ci_ok[None, :], other=0.0)
                if INTERPRETER:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(grad_input_ptr + image[:, None] * is_n + ci[None, :] * is_c + ih * is_h + iw * is_w,
             cast(acc, grad_input_ptr.dtype.element_ty, INTERPRETER), mask=row_ok[:, None] & ci_ok[None, :])
