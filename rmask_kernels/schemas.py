"""The schemas of the rmask ops, as Python strings: the same text as csrc/masked_conv2d_schemas.h
(tests/test_schemas.py checks that they equal the ones the compiled library registers).

The compiled library defines both op families from the header. Without it, rmask_kernels/ops.py
defines the ``triton_`` family from these strings, so the Triton kernels (which need no C++
toolchain) still serve; what each argument means is said in the header.
"""

from __future__ import annotations

import torch

MASKED_CONV2D = (
    "masked_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor mask, "
    "Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, Tensor position_channels, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? residual=None, Tensor? input_mask=None, "
    "Tensor? input_offsets=None, Tensor? input_channels=None, "
    "*, bool relu=False) -> Tensor"
)

MASKED_CONV2D_STATS = (
    "masked_conv2d_stats(Tensor input, Tensor weight, Tensor? bias, Tensor mask, "
    "Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, Tensor position_channels, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? input_mask=None, "
    "Tensor? input_offsets=None, Tensor? input_channels=None) "
    "-> (Tensor, Tensor, Tensor)"
)

MASKED_CONV2D_BACKWARD = (
    "masked_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
    "Tensor mask, Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, "
    "Tensor position_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "bool[3] output_mask, Tensor? relu_output=None, Tensor? input_mask=None, "
    "Tensor? input_offsets=None, Tensor? input_channels=None) "
    "-> (Tensor, Tensor, Tensor)"
)

SCHEMAS = (MASKED_CONV2D, MASKED_CONV2D_STATS, MASKED_CONV2D_BACKWARD)

# The libraries that hold the definitions made here: an op lives as long as its library.
_libraries = []


def define_family(prefix: str) -> None:
    """Define the ops ``rmask::<prefix>masked_conv2d*`` from SCHEMAS."""
    library = torch.library.Library("rmask", "FRAGMENT")
    for schema in SCHEMAS:
        library.define(prefix + schema)
    _libraries.append(library)
