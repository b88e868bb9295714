"""Python side of the rmask ops: loading the compiled library, fake kernels, autograd.

The schemas live in csrc/masked_conv2d.cpp (two families: ``masked_conv2d*`` for the C++
kernels in csrc/cpu/ and csrc/cuda/, ``triton_masked_conv2d*`` for rmask_kernels/triton/);
the fake kernels and autograd of both are registered here. When the extension is not built
the package still works (warned once): the ``triton_`` family is then defined here from the
same schemas (rmask_kernels/schemas.py), and the C++ backends fall back to the reference path.
"""

from __future__ import annotations

import warnings

import torch

from . import schemas

try:
    from . import _C  # noqa: F401  (registers torch.ops.rmask.*)

    EXTENSION_ERROR = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    EXTENSION_ERROR = error
    warnings.warn(
        f"rmask_kernels: compiled extension not available ({error}); "
        "backends 'cpu' and 'cuda' use the reference path (F.conv2d * mask). Build it with `make install`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def _output_shape(input, weight, stride, padding, dilation):
    n, _, h, w = input.shape
    kh, kw = weight.shape[2:]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, weight.shape[0], out_h, out_w)


def _memory_format(tensor):
    return torch._prims_common.suggest_memory_format(tensor)


# The two op families with identical schemas (csrc/masked_conv2d.cpp): the plain ops, served
# by the C++ kernels (csrc/cpu, csrc/cuda), and the triton_ ops, served by rmask_kernels/triton.
# Both get their fake kernels and autograd from the one code path below.
FAMILIES = ("", "triton_")


def _register_family(prefix: str) -> None:
    backward_op = getattr(torch.ops.rmask, f"{prefix}masked_conv2d_backward")

    @torch.library.register_fake(f"rmask::{prefix}masked_conv2d")
    def _masked_conv2d_fake(input, weight, bias, mask, *index_conv_args_and_residual, relu=False):
        stride, padding, dilation, groups = index_conv_args_and_residual[4:8]
        shape = _output_shape(input, weight, stride, padding, dilation)
        return input.new_empty(shape).contiguous(memory_format=_memory_format(input))

    @torch.library.register_fake(f"rmask::{prefix}masked_conv2d_backward")
    def _masked_conv2d_backward_fake(grad_output, input, weight, mask, *index_conv_args_and_output_mask):
        output_mask = index_conv_args_and_output_mask[-1]
        grad_input = (
            torch.empty_like(input, memory_format=_memory_format(input)) if output_mask[0] else input.new_empty(0)
        )
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else weight.new_empty(0)
        grad_bias = input.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0)
        return grad_input, grad_weight, grad_bias

    @torch.library.register_fake(f"rmask::{prefix}masked_conv2d_stats")
    def _masked_conv2d_stats_fake(input, weight, bias, mask, *index_and_conv_args):
        output = _masked_conv2d_fake(input, weight, bias, mask, *index_and_conv_args)
        channels = weight.shape[0]
        return output, input.new_empty(channels, dtype=torch.float64), input.new_empty(channels, dtype=torch.float64)

    def _conv_backward(ctx, grad_output, input, weight, mask, index):
        needs = ctx.needs_input_grad
        output_mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]
        if not any(output_mask) or grad_output is None:
            return (None,) * 12
        if input is None:  # only the input gradient is wanted: its values are never read
            shape, dtype, device, memory_format = ctx.input_meta
            # In the input's memory format: the kernels give the input gradient in its format.
            input = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        grad_input, grad_weight, grad_bias = backward_op(
            grad_output, input, weight, mask, *index, *ctx.conv_args, output_mask
        )
        return (
            grad_input if output_mask[0] else None,
            grad_weight if output_mask[1] else None,
            grad_bias if output_mask[2] else None,
        ) + (None,) * 9

    def _backward(ctx, grad_output):
        input, weight, relu_output, mask, *index = ctx.saved_tensors
        if relu_output is not None:
            grad_output = grad_output * (relu_output > 0)
        # The residual is added at every position: its gradient is the (ReLU-gated) output's.
        grad_residual = grad_output if ctx.has_residual and ctx.needs_input_grad[12] else None
        return _conv_backward(ctx, grad_output, input, weight, mask, index) + (grad_residual,)

    torch.library.register_autograd(f"rmask::{prefix}masked_conv2d", _backward, setup_context=_setup_context)

    def _stats_backward(ctx, grad_output, grad_sum, grad_sum_of_squares):
        # sum_c = sum of y[n, c, p] over kept (n, p); sum_of_squares_c likewise of y^2, and y is 0
        # where masked: d sum / d y = mask, d sum_of_squares / d y = 2 y.
        input, weight, output, mask, *index = ctx.saved_tensors
        if grad_output is None and grad_sum is None and grad_sum_of_squares is None:
            return (None,) * 12
        grad = grad_output if grad_output is not None else torch.zeros_like(output)
        if grad_sum is not None:
            grad = grad + grad_sum.to(output.dtype).view(-1, 1, 1) * mask
        if grad_sum_of_squares is not None:
            grad = grad + 2 * output * grad_sum_of_squares.to(output.dtype).view(-1, 1, 1)
        return _conv_backward(ctx, grad, input, weight, mask, index)

    torch.library.register_autograd(
        f"rmask::{prefix}masked_conv2d_stats", _stats_backward, setup_context=_stats_setup_context
    )


def _save_for_conv_backward(ctx, inputs, extra_output):
    input, weight, bias, mask, *index, stride, padding, dilation, groups = inputs[:12]
    needs_weight = ctx.needs_input_grad[1]
    # Weight gradient needs the input: save it only then. The weight is always saved: the
    # input gradient reads it, and every backward takes the geometry from its shape (it is
    # weight-sized, and usually a parameter held anyway).
    ctx.save_for_backward(input if needs_weight else None, weight, extra_output, mask, *index)
    ctx.input_meta = (input.shape, input.dtype, input.device, _memory_format(input))
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    # A fused ReLU's gradient gate is the output itself (> 0).
    _save_for_conv_backward(ctx, inputs, output if keyword_only_inputs.get("relu", False) else None)
    ctx.has_residual = len(inputs) > 12 and inputs[12] is not None


def _stats_setup_context(ctx, inputs, output):
    _save_for_conv_backward(ctx, inputs, output[0])
    # Sums nobody differentiates arrive as None rather than zero tensors: their terms
    # below cost full passes over the output.
    ctx.set_materialize_grads(False)


if not extension_loaded():
    # The Triton kernels need no compiled code: their op family is defined from Python.
    schemas.define_family("triton_")
for _prefix in FAMILIES if extension_loaded() else ("triton_",):
    _register_family(_prefix)
# The Triton family's implementations (registering them imports no triton).
from . import triton as _triton  # noqa: E402,F401
