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

from . import autocast, schemas
from .geometry import conv_output_size
from .torch_target import check_torch_version

check_torch_version(torch.__version__)  # before the extension loads: a clear error, not a missing symbol

try:
    from . import _C  # noqa: F401  (registers torch.ops.rmask.*)

    EXTENSION_ERROR = None
except (ImportError, OSError) as error:  # not built, or not loadable here
    EXTENSION_ERROR = error
    warnings.warn(
        f"rmask_kernels: compiled extension not available ({error}); "
        "backends 'cpu' and 'cuda' use the reference path (F.conv2d * mask). Build it with `make install`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def _memory_format(tensor):
    return torch._prims_common.suggest_memory_format(tensor)


def argument_names(op) -> tuple:
    """``op``'s positional arguments by name, in schema order (csrc/masked_conv2d_schemas.h):
    what its setup_context receives as ``inputs`` and what its backward returns gradients for."""
    return tuple(argument.name for argument in op.default._schema.arguments if not argument.kwarg_only)


# The schema arguments the backward reads back by name (the same in every rmask op).
KEPT_INDEX_ARGUMENTS = ("kept_offsets", "kept_positions", "position_offsets", "position_channels")
CONV_ARGUMENTS = ("stride", "padding", "dilation", "groups")
# An input mask and its lists (the by-position part of rk.kept_index(input_mask, C_in)).
INPUT_MASK_ARGUMENTS = ("input_mask", "input_offsets", "input_channels")


def _in_schema_order(names: tuple, gradients: dict) -> tuple:
    """A backward's return value: each argument's gradient from ``gradients`` (None where absent)."""
    return tuple(gradients.get(name) for name in names)


# The two op families with identical schemas (csrc/masked_conv2d.cpp): the plain ops, served
# by the C++ kernels (csrc/cpu, csrc/cuda), and the triton_ ops, served by rmask_kernels/triton.
# Both get their fake kernels and autograd from the one code path below.
FAMILIES = ("", "triton_")


def register_op_family(namespace: str, prefix: str) -> None:
    """Fake kernels, autograd and autocast rules (rmask_kernels/autocast.py) for the three ops
    ``namespace::{prefix}masked_conv2d*`` (the rmask schemas): the rmask families below, and the
    CUDA kernels' host emulation in the tests."""
    family = getattr(torch.ops, namespace)
    conv_op = getattr(family, f"{prefix}masked_conv2d")
    stats_op = getattr(family, f"{prefix}masked_conv2d_stats")
    backward_op = getattr(family, f"{prefix}masked_conv2d_backward")
    conv_arguments, stats_arguments = argument_names(conv_op), argument_names(stats_op)

    @torch.library.register_fake(f"{namespace}::{prefix}masked_conv2d")
    def _masked_conv2d_fake(
        input, weight, bias, mask, kept_offsets, kept_positions, position_offsets, position_channels,
        stride, padding, dilation, groups, residual=None, input_mask=None, input_offsets=None, input_channels=None,
        *, relu=False,
    ):
        top_bottom, left_right = padding
        out_size = conv_output_size(
            input.shape[2:], weight.shape[2:], stride, (top_bottom, top_bottom, left_right, left_right), dilation
        )
        shape = (input.shape[0], weight.shape[0], *out_size)
        return input.new_empty(shape).contiguous(memory_format=_memory_format(input))

    @torch.library.register_fake(f"{namespace}::{prefix}masked_conv2d_backward")
    def _masked_conv2d_backward_fake(
        grad_output, input, weight, mask, kept_offsets, kept_positions, position_offsets, position_channels,
        stride, padding, dilation, groups, output_mask, relu_output=None, input_mask=None, input_offsets=None,
        input_channels=None,
    ):
        wants_input, wants_weight, wants_bias = output_mask
        grad_input = (
            torch.empty_like(input, memory_format=_memory_format(input)) if wants_input else input.new_empty(0)
        )
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if wants_weight else weight.new_empty(0)
        grad_bias = input.new_empty(weight.shape[0]) if wants_bias else input.new_empty(0)
        return grad_input, grad_weight, grad_bias

    @torch.library.register_fake(f"{namespace}::{prefix}masked_conv2d_stats")
    def _masked_conv2d_stats_fake(
        input, weight, bias, mask, kept_offsets, kept_positions, position_offsets, position_channels,
        stride, padding, dilation, groups, input_mask=None, input_offsets=None, input_channels=None,
    ):
        output = _masked_conv2d_fake(
            input, weight, bias, mask, kept_offsets, kept_positions, position_offsets, position_channels,
            stride, padding, dilation, groups,
        )
        channels = weight.shape[0]
        return output, input.new_empty(channels, dtype=torch.float64), input.new_empty(channels, dtype=torch.float64)

    def _conv_gradients(ctx, grad_output, input, weight, mask, kept_index, input_masks, relu_output=None) -> dict:
        """The gradients of input, weight and bias that are needed, by name; with ``relu_output``
        (a fused ReLU's output) the backward op gates grad_output by it where it reads it;
        ``input_masks``: the input mask and its lists (INPUT_MASK_ARGUMENTS order)."""
        needs = ctx.needs_grad
        output_mask = [needs["input"], needs["weight"], needs["bias"]]
        if not any(output_mask) or grad_output is None:
            return {}
        if input is None:  # only the input gradient is wanted: its values are never read
            shape, dtype, device, memory_format = ctx.input_meta
            # In the input's memory format: the kernels give the input gradient in its format.
            input = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        grad_input, grad_weight, grad_bias = backward_op(
            grad_output=grad_output, input=input, weight=weight, mask=mask,
            **dict(zip(KEPT_INDEX_ARGUMENTS, kept_index)), **ctx.conv_args, output_mask=output_mask,
            relu_output=relu_output, **dict(zip(INPUT_MASK_ARGUMENTS, input_masks)),
        )
        # A gradient not asked for comes back as an empty tensor: leave it out.
        wanted = zip(("input", "weight", "bias"), output_mask, (grad_input, grad_weight, grad_bias))
        return {name: grad for name, asked, grad in wanted if asked}

    def _setup_context(ctx, inputs, keyword_only_inputs, output):
        # A fused ReLU's gradient gate is the output itself (> 0).
        relu_output = output if keyword_only_inputs.get("relu", False) else None
        _save_for_conv_backward(ctx, dict(zip(conv_arguments, inputs)), relu_output)

    def _backward(ctx, grad_output):
        input, weight, relu_output, mask, *rest = ctx.saved_tensors
        input_masks, kept_index = rest[:len(INPUT_MASK_ARGUMENTS)], rest[len(INPUT_MASK_ARGUMENTS):]
        gradients = _conv_gradients(ctx, grad_output, input, weight, mask, kept_index, input_masks, relu_output)
        # The residual is added at every position, masked ones included: its gradient is the
        # (ReLU-gated) output's over the whole tensor, the one full pass, made only for it.
        if ctx.needs_grad.get("residual", False):
            gradients["residual"] = grad_output if relu_output is None else grad_output * (relu_output > 0)
        return _in_schema_order(conv_arguments, gradients)

    torch.library.register_autograd(f"{namespace}::{prefix}masked_conv2d", _backward, setup_context=_setup_context)

    def _stats_setup_context(ctx, inputs, output):
        _save_for_conv_backward(ctx, dict(zip(stats_arguments, inputs)), output[0])
        # Sums nobody differentiates arrive as None rather than zero tensors: their terms
        # below cost full passes over the output.
        ctx.set_materialize_grads(False)

    def _stats_backward(ctx, grad_output, grad_sum, grad_sum_of_squares):
        # sum_c = sum of y[n, c, p] over kept (n, p); sum_of_squares_c likewise of y^2, and y is 0
        # where masked: d sum / d y = mask, d sum_of_squares / d y = 2 y.
        input, weight, output, mask, *rest = ctx.saved_tensors
        input_masks, kept_index = rest[:len(INPUT_MASK_ARGUMENTS)], rest[len(INPUT_MASK_ARGUMENTS):]
        if grad_output is None and grad_sum is None and grad_sum_of_squares is None:
            return _in_schema_order(stats_arguments, {})
        grad = grad_output if grad_output is not None else torch.zeros_like(output)
        if grad_sum is not None:
            grad = grad + grad_sum.to(output.dtype).view(-1, 1, 1) * mask
        if grad_sum_of_squares is not None:
            grad = grad + 2 * output * grad_sum_of_squares.to(output.dtype).view(-1, 1, 1)
        return _in_schema_order(stats_arguments, _conv_gradients(ctx, grad, input, weight, mask, kept_index, input_masks))

    torch.library.register_autograd(
        f"{namespace}::{prefix}masked_conv2d_stats", _stats_backward, setup_context=_stats_setup_context
    )
    autocast.register_autocast(namespace, prefix)


def _save_for_conv_backward(ctx, arguments: dict, extra_output):
    """Saves what the conv backward reads, from the op's ``arguments`` by name."""
    # Which arguments need a gradient, by name (an argument left at its default by the caller
    # may be missing from the end of needs_input_grad: it needs none).
    ctx.needs_grad = {name: bool(needs) for name, needs in zip(arguments, ctx.needs_input_grad)}
    input, weight = arguments["input"], arguments["weight"]
    # Weight gradient needs the input: save it only then. The weight is always saved: the
    # input gradient reads it, and every backward takes the geometry from its shape (it is
    # weight-sized, and usually a parameter held anyway).
    saved_input = input if ctx.needs_grad["weight"] else None
    kept_index = [arguments[name] for name in KEPT_INDEX_ARGUMENTS]
    input_masks = [arguments.get(name) for name in INPUT_MASK_ARGUMENTS]
    ctx.save_for_backward(saved_input, weight, extra_output, arguments["mask"], *input_masks, *kept_index)
    ctx.input_meta = (input.shape, input.dtype, input.device, _memory_format(input))
    ctx.conv_args = {name: arguments[name] for name in CONV_ARGUMENTS}


if not extension_loaded():
    # The Triton kernels need no compiled code: their op family is defined from Python.
    schemas.define_family("triton_")
for _prefix in FAMILIES if extension_loaded() else ("triton_",):
    register_op_family("rmask", _prefix)
# The Triton family's implementations (registering them imports no triton).
from . import triton as _triton  # noqa: E402,F401
