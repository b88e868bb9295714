"""Convolution geometry: argument pairs, padding and the output size, written once.

Depends on nothing in the package, so both the op's fake kernels (ops.py) and the public
functional entry point (functional.py, which re-exports these) use the one formula.
"""

from __future__ import annotations

from typing import Tuple


def pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def resolve_padding(padding, kernel_size, stride, dilation) -> Tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right); "same" may be asymmetric for even kernels."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            sides = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                sides += [total // 2, total - total // 2]
            return tuple(sides)
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (ph, ph, pw, pw)


def conv_output_size(size, kernel_size, stride, padding4, dilation) -> Tuple[int, int]:
    """The (H_out, W_out) of a convolution of spatial ``size`` padded by (top, bottom, left, right)."""
    h, w = size
    top, bottom, left, right = padding4
    out_h = (h + top + bottom - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (w + left + right - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return out_h, out_w
