"""The Triton backend: implementations of the ``rmask::triton_*`` ops (schemas in
csrc/masked_conv2d.cpp, or rmask_kernels/schemas.py without the compiled extension; fake
kernels and autograd in rmask_kernels/ops.py).

Registering imports no triton: the kernels (masked_conv2d.py and the modules it names) are
imported on the first call. They serve CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1`` (Triton's interpreter, which the tests use on machines without a GPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

DEVICE_TYPES = ("cuda", "cpu")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: Triton then runs the kernels in its interpreter, on CPU
    tensors too. The one place the package reads the variable; triton itself reads it when a
    kernel is defined (common.INTERPRET keeps the value of that moment)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(device: torch.device):
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "rmask triton ops: the Triton kernels run on CPU tensors only in Triton's interpreter; "
            "set TRITON_INTERPRET=1 before the first call (or use backend='cpu' / a CUDA tensor)"
        )
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("rmask triton ops: triton is not installed (pip install triton); "
                           "use backend='cuda', 'cpu' or 'reference'")
    entry_points = importlib.import_module(".masked_conv2d", __name__)
    if device.type == "cpu" and not importlib.import_module(".common", __name__).INTERPRET:
        raise RuntimeError(
            "rmask triton ops: TRITON_INTERPRET=1 was set after the Triton kernels were compiled for the GPU; "
            "set it before the first call to run them on CPU tensors"
        )
    return entry_points


@torch.library.register_kernel("rmask::triton_masked_conv2d", DEVICE_TYPES)
def _masked_conv2d(input, weight, bias, mask, kept_offsets, kept_positions, position_offsets, position_channels,
                   stride, padding, dilation, groups, residual=None, input_mask=None, input_offsets=None,
                   input_channels=None, *, relu=False):
    input = _masked_input("triton_masked_conv2d", input, input_mask, input_offsets, input_channels)
    return _kernels(input.device).masked_conv2d_forward(
        input, weight, bias, mask, kept_offsets, kept_positions, position_offsets, position_channels,
        stride, padding, dilation, groups, residual=residual, relu=relu,
    )[0]


@torch.library.register_kernel("rmask::triton_masked_conv2d_stats", DEVICE_TYPES)
def _masked_conv2d_stats(input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                         position_channels, stride, padding, dilation, groups, input_mask=None, input_offsets=None,
                         input_channels=None):
    input = _masked_input("triton_masked_conv2d_stats", input, input_mask, input_offsets, input_channels)
    return _kernels(input.device).masked_conv2d_forward(
        input, weight, bias, mask, kept_offsets, kept_positions, position_offsets, position_channels,
        stride, padding, dilation, groups, channel_stats=True,
    )


@torch.library.register_kernel("rmask::triton_masked_conv2d_backward", DEVICE_TYPES)
def _masked_conv2d_backward(grad_output, input, weight, mask, kept_offsets, kept_positions, position_offsets,
                            position_channels, stride, padding, dilation, groups, output_mask, relu_output=None,
                            input_mask=None, input_offsets=None, input_channels=None):
    input = _masked_input("triton_masked_conv2d_backward", input, input_mask, input_offsets, input_channels)
    grad_input, grad_weight, grad_bias = _kernels(input.device).masked_conv2d_backward(
        grad_output, input, weight, mask, kept_offsets, kept_positions, position_offsets, position_channels,
        stride, padding, dilation, groups, output_mask, relu_output,
    )
    if output_mask[0] and input_mask is not None:
        grad_input.mul_(input_mask)  # 0 at masked inputs
    return grad_input, grad_weight, grad_bias


def _masked_input(op, input, input_mask, input_offsets, input_channels):
    """``input * input_mask``, checked with its lists (triton/geometry.py; imported on use: it
    imports triton)."""
    if input_mask is None and input_offsets is None and input_channels is None:
        return input
    return importlib.import_module(".geometry", __name__).masked_input(
        op, input, input_mask, input_offsets, input_channels
    )
