"""Training-mode BN over the kept outputs of a masked conv (``bn_stats="kept"``), given the
batch statistics of those outputs: the normalization, its affine and an optional ReLU, with
BN's closed-form backward, and a residual added before the ReLU. Float32 NCHW CPU tensors run
the extension's kernels (csrc/cpu/kept_batch_norm.cpp: one pass forward, two per channel
backward, the second from L2); everything else runs the formula below in torch ops, which is
also their test oracle.
"""

from __future__ import annotations

import torch

from . import ops


def use_cpu_kernels(y: torch.Tensor, mask: torch.Tensor, *vectors) -> bool:
    """Whether the extension's kernels serve this call: float32 NCHW-contiguous ``y`` on the
    CPU, a contiguous bool mask, float32 per-channel vectors (None: absent), outside
    torch.compile (which traces the formula)."""
    return (
        y.device.type == "cpu" and y.dtype == torch.float32 and y.dim() == 4 and y.is_contiguous()
        and mask.dtype == torch.bool and mask.is_contiguous()
        and all(v is None or v.dtype == torch.float32 for v in vectors)
        and ops.extension_loaded() and not torch.compiler.is_compiling()
    )


def kept_batch_norm(y, mask, count, mean, rstd, weight, bias, relu: bool, residual=None) -> torch.Tensor:
    """``KeptBatchNorm.apply`` (see there)."""
    return KeptBatchNorm.apply(y, mask, count, mean, rstd, weight, bias, relu, residual)


class KeptBatchNorm(torch.autograd.Function):
    """Training-mode BN over the kept outputs of a masked conv (``y``, zero where masked),
    its affine and an optional ReLU, given the batch statistics ``mean`` and ``rstd`` of the
    kept outputs (``count`` per channel); ``residual`` (optional, ``y``'s shape and dtype, e.g.
    a ResNet block's shortcut) is added before the ReLU, in the same pass. The backward is BN's
    own closed form, with the statistics' dependence on ``y`` included: two full passes forward
    and six backward, about half of what autograd through the same formula takes.

    The input gradient is only meaningful at kept positions: masked outputs are constant
    zeros, and every masked-conv backward ignores its gradient there. Arithmetic in the
    statistics' dtype (float32 for a float16/bfloat16 ``y``); the output in ``y``'s dtype.
    """

    @staticmethod
    def forward(ctx, y, mask, count, mean, rstd, weight, bias, relu, residual=None):
        scale = rstd if weight is None else rstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        ctx.kernels = use_cpu_kernels(y, mask, count, mean, rstd, weight, bias, residual)
        if ctx.kernels:
            out = torch.ops.rmask.cpu_kept_batch_norm(y, mask, scale, shift, relu, residual)
        else:
            # y is 0 where masked, so y * scale + shift * mask is BN on kept positions and 0 elsewhere.
            out = torch.addcmul(shift.view(-1, 1, 1) * mask, y, scale.view(-1, 1, 1)).to(y.dtype)
            if residual is not None:
                out += residual
            if relu:
                out.clamp_min_(0)
        ctx.save_for_backward(y, mask, out if relu else None, count, mean, rstd, weight)
        ctx.relu = relu
        ctx.residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, mask, out, count, mean, rstd, weight = ctx.saved_tensors
        # The residual's gradient is g, grad_out through the ReLU (grad_out itself without one).
        want_residual = ctx.residual and ctx.needs_input_grad[8]
        if ctx.kernels and not torch.is_grad_enabled():  # (a double backward differentiates the formula)
            scale = rstd if weight is None else rstd * weight
            gated = want_residual and ctx.relu
            grad_y, sum_g, sum_g_xhat, g = torch.ops.rmask.cpu_kept_batch_norm_backward(
                grad_out, y, mask, out, mean, rstd, scale, count, gated)
            grad_weight = sum_g_xhat if weight is not None and ctx.needs_input_grad[5] else None
            grad_bias = sum_g if ctx.needs_input_grad[6] else None
            grad_residual = (g if gated else grad_out) if want_residual else None
            return grad_y, None, None, None, None, grad_weight, grad_bias, None, grad_residual
        g = torch.ops.aten.threshold_backward(grad_out, out, 0) if ctx.relu else grad_out
        grad_residual = g if want_residual else None
        g, y = g.to(rstd.dtype), y.to(rstd.dtype)
        # Per channel, over the kept positions: sum of g, and sum of g * xhat with
        # xhat = (y - mean) * rstd (y is 0 where masked, so g * y needs no mask).
        sum_g = (g.sum(0) * mask).sum((1, 2))
        sum_g_xhat = rstd * ((g * y).sum((0, 2, 3)) - mean * sum_g)
        scale = rstd if weight is None else rstd * weight
        # grad_y = scale * (g - sum_g / count - xhat * sum_g_xhat / count), expanded into
        # per-channel a * g + b * y + c.
        k = scale * rstd * sum_g_xhat / count
        constant = (k * mean - scale * sum_g / count).view(-1, 1, 1)
        grad_y = torch.addcmul(constant, g, scale.view(-1, 1, 1)).addcmul_(y, -k.view(-1, 1, 1))
        grad_weight = sum_g_xhat if weight is not None and ctx.needs_input_grad[5] else None
        grad_bias = sum_g if ctx.needs_input_grad[6] else None
        return grad_y, None, None, None, None, grad_weight, grad_bias, None, grad_residual
