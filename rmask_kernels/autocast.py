"""The rmask ops under ``torch.autocast``: they cast their arguments as ``F.conv2d`` does.

Inside an autocast region a convolution runs in the region's lower-precision dtype (float16
or bfloat16): autocast casts every floating-point tensor argument that is not float64 to it.
The rmask convolution ops follow the same rule, for every backend: their autocast kernels
(the AutocastCPU and AutocastCUDA dispatch keys, registered here for both op families) cast
the input, weight, bias and residual, then run the op with autocast off, so the output is
in the autocast dtype (the statistics of masked_conv2d_stats stay float64). The backward op
has no autocast kernel: it runs in the dtypes the forward saved, as autograd gives them.
``rk.masked_conv2d`` applies the same cast itself before it checks its arguments and picks a
backend (``cast``; the layers cast a residual with ``cast_for_autocast``), so the reference path
and the kernels agree.
"""

from __future__ import annotations

from typing import Optional

import torch

# The device types whose autocast the ops follow.
DEVICE_TYPES = ("cpu", "cuda")

# The ops that compute a convolution (the backward is not cast: see above).
CAST_OPS = ("masked_conv2d", "masked_conv2d_stats")

_libraries = []  # the registrations live as long as these


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts convolutions to on ``device_type`` now, or None outside autocast."""
    if device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(tensor, dtype: torch.dtype):
    """``tensor`` as autocast would pass it to a lower-precision op: floating-point tensors
    other than float64 in ``dtype``; anything else unchanged."""
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype not in (dtype, torch.float64):
        return tensor.to(dtype)
    return tensor


def cast_for_autocast(device_type: str, *tensors):
    """``tensors`` cast as autocast casts a convolution's arguments on ``device_type`` now
    (unchanged outside autocast)."""
    dtype = autocast_dtype(device_type)
    return tensors if dtype is None else tuple(cast(tensor, dtype) for tensor in tensors)


def autocast_key(device_type: str):
    """The autocast dispatch key of ``device_type`` (AutocastCPU, AutocastCUDA)."""
    return getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))


def autocast_excluded(device_type: str):
    """A guard under which ops skip their autocast kernels on ``device_type`` (arguments already cast)."""
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(autocast_key(device_type)))


def register_autocast(namespace: str, prefix: str) -> None:
    """Autocast kernels (CPU and CUDA) for the ops ``namespace::{prefix}{CAST_OPS}``."""
    library = torch.library.Library(namespace, "IMPL")
    _libraries.append(library)
    for name in CAST_OPS:
        op = getattr(getattr(torch.ops, namespace), prefix + name).default
        for device_type in DEVICE_TYPES:
            key = autocast_key(device_type)
            kernel = _autocast_kernel(op, device_type)
            # As torch.library.register_autocast does: the Python kernel for tracing modes
            # (torch.compile), the dispatcher's kernel for eager calls.
            op.py_impl(key)(kernel)
            library.impl(prefix + name, lambda _keyset, *args, _kernel=kernel, **kwargs: _kernel(*args, **kwargs),
                         key.name, with_keyset=True)


def _autocast_kernel(op, device_type: str):
    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        with autocast_excluded(device_type):
            return op(*(cast(argument, dtype) for argument in args), **kwargs)

    return kernel
