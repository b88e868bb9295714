"""masked_conv2d: the public functional entry point."""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import reference
from .autocast import autocast_dtype, autocast_excluded, cast
from .backends import (AVAILABLE, batch_vector_kernels, check_backend, gpu_sparse_pays_off, resolve_backend,
                       sparse_pays_off)
from .geometry import conv_output_size, pair, resolve_padding  # also importable from here
from .masks import check_kept_index
from .masks import kept_index as build_kept_index

IntPair = Union[int, Tuple[int, int]]

# Index lists of masks passed to the functional API, built once per mask tensor (and
# rebuilt if the mask is modified in place). Layers keep their own and pass them in.
# Keyed by id() with a weak reference that drops the entry when the mask dies (a
# WeakKeyDictionary would compare tensors with ==, which is elementwise).
_index_cache: dict = {}


def cached_kept_index(mask: torch.Tensor, out_channels: int):
    key = id(mask)
    hit = _index_cache.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == (mask._version, out_channels):
        return hit[2]
    index = build_kept_index(mask, out_channels)
    alive = weakref.ref(mask, lambda _, key=key: _index_cache.pop(key, None))
    _index_cache[key] = (alive, (mask._version, out_channels), index)
    return index


# (index, mask) pairs given to the functional API whose values check_kept_index has accepted,
# keyed by id() like _index_cache and dropped when either tensor dies: each pair is checked
# once, and again only if one of its tensors is modified in place.
_checked_index_cache: dict = {}


def checked_kept_index(index, mask: torch.Tensor, out_channels: int, name: str = "kept_index"):
    """``index``, checked against ``mask`` the first time this pair is seen (rk.check_kept_index;
    ``name``: what its errors call the index)."""
    if torch.compiler.is_compiling():
        return index  # checked when the model ran eagerly; a check would break the graph
    try:
        key, state = _pair_state(index, mask, out_channels)
        hit = _checked_index_cache.get(key)
        if hit is not None and hit[0]() is index[1] and hit[1]() is mask and hit[2] == state:
            return index
    except (TypeError, IndexError, AttributeError):
        pass  # not four tensors: check_kept_index says what is wrong
    index = check_kept_index(index, mask, out_channels, name)
    key, state = _pair_state(index, mask, out_channels)
    forget = lambda _, key=key: _checked_index_cache.pop(key, None)  # noqa: E731
    _checked_index_cache[key] = (weakref.ref(index.positions, forget), weakref.ref(mask, forget), state)
    return index


def _pair_state(index, mask: torch.Tensor, out_channels: int):
    """The cache key of an (index, mask) pair (by identity) and the state its check holds for."""
    return (id(index[1]), id(mask)), (out_channels, mask._version, *(tensor._version for tensor in index))


def check_mask_for_output(mask: torch.Tensor, out_channels: int, out_size: Tuple[int, int], where: str = "mask"):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where} must be a bool tensor (True = kept), got dtype {mask.dtype}")
    expected = (out_channels, *out_size)
    if mask.dim() != 3 or mask.shape[0] not in (1, out_channels) or tuple(mask.shape[1:]) != tuple(out_size):
        raise ValueError(
            f"{where} has shape {tuple(mask.shape)} but this convolution's output is {expected}: "
            f"expected {expected} or {(1, *out_size)} (a mask built for another size?)"
        )


def check_input_mask(input_mask, in_channels: int, size, device: torch.device):
    """An input mask's checks: bool, (C_in, H_in, W_in) or (1, H_in, W_in) for this input, on
    its device."""
    if not isinstance(input_mask, torch.Tensor):
        raise TypeError(f"input_mask must be a bool tensor, got {type(input_mask).__name__}")
    if input_mask.dtype != torch.bool:
        raise TypeError(f"input_mask must be a bool tensor (True = kept), got dtype {input_mask.dtype}")
    expected = (in_channels, *size)
    if input_mask.dim() != 3 or input_mask.shape[0] not in (1, in_channels) or tuple(input_mask.shape[1:]) != tuple(size):
        raise ValueError(
            f"input_mask has shape {tuple(input_mask.shape)} but this convolution's input is {expected}: "
            f"expected {expected} or {(1, *size)} (a mask built for another size?)"
        )
    if input_mask.device != device:
        raise ValueError(f"input_mask must be on the input's device {device}, got {input_mask.device}")


# The ops (conv, stats) each compiled backend is reached through; the Triton kernels are a
# second op family with the same schemas. Filled on first use (the schemas must exist by then).
KERNEL_OPS: dict = {}


def kernel_ops(backend: str):
    ops = KERNEL_OPS.get(backend)
    if ops is None:
        prefix = "triton_" if backend == "triton" else ""
        family = torch.ops.rmask
        ops = KERNEL_OPS[backend] = (getattr(family, prefix + "masked_conv2d"), getattr(family, prefix + "masked_conv2d_stats"))
    return ops


def select_backend(
    backend: str,
    input: torch.Tensor,
    mask: torch.Tensor,
    kept_index=None,
    out_channels=None,
    groups: int = 1,
    with_grad: bool = False,
    kernel_height: int = 1,
) -> str:
    """The backend that runs a masked conv of ``input`` (batched, 4-D) with ``mask``, by a kernel
    ``kernel_height`` rows high; ``with_grad``: the call will be differentiated (its backward
    counts too)."""
    chosen = resolve_backend(backend, input)
    if backend == "auto" and chosen != "reference":
        index = kept_index if kept_index is not None else cached_kept_index(mask, out_channels or mask.shape[0])
        positions = mask.shape[1] * mask.shape[2]
        if chosen in ("triton", "cuda"):
            pays_off = gpu_sparse_pays_off(index, positions)
        else:
            pays_off = sparse_pays_off(index, positions, input.shape[0], input.dtype, groups, kernel_height, with_grad)
        if not pays_off:
            chosen = "reference"
    return chosen


def float32_kernels_under_autocast(
    autocast_to, backend, input, weight, bias, mask, kept_index, groups, residual
) -> bool:
    """Inside CPU autocast to ``autocast_to``: whether to run the float32 batch-vector kernels and
    return that dtype, rather than the CPU op in it (the portable kernels, many times slower:
    benchmarks/investigations/autocast_cpu.py) or, for "auto", dense conv × mask in it.
    Backend "cpu": wherever the float32 kernels serve; "auto": where they also beat the dense
    conv in the autocast dtype (backends.sparse_pays_off's dense_dtype). Anything malformed
    answers False: the checks below then say what is wrong."""
    if backend not in ("auto", "cpu") or "cpu" not in AVAILABLE or input.device.type != "cpu":
        return False
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16) or input.dim() not in (3, 4):
        return False
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not isinstance(groups, int):
        return False
    batch = input.shape[0] if input.dim() == 4 else 1
    if not batch_vector_kernels(torch.float32, groups, batch, weight.shape[2]):
        return False
    if backend == "cpu":
        return True
    out_channels = weight.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3 \
            or mask.shape[0] not in (1, out_channels):
        return False
    index = kept_index if kept_index is not None else cached_kept_index(mask, out_channels)
    with_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (input, weight, bias, residual)
    )
    positions = mask.shape[1] * mask.shape[2]
    return sparse_pays_off(index, positions, batch, torch.float32, groups, weight.shape[2], with_grad,
                           dense_dtype=autocast_to)


def masked_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    backend: str = "auto",
    kept_index=None,
    relu: bool = False,
    channel_stats: bool = False,
    residual: Optional[torch.Tensor] = None,
    input_mask: Optional[torch.Tensor] = None,
    input_index=None,
):
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups) * mask``, differentiable,
    computing only the kept outputs where a compiled backend serves the tensor.

    ``mask``: bool (C_out, H_out, W_out) or (1, H_out, W_out), True = kept (see random_mask).
    ``kept_index``: optional precomputed ``rk.kept_index(mask, C_out)``; layers pass theirs. Its
    values are checked against the mask the first time a pair is seen (``rk.check_kept_index``).
    ``relu``: apply ReLU in the kernel's epilogue (the paper's unit at inference).
    ``residual``: a tensor of the output's shape added at every position (masked ones
    included) before the ReLU, in the kernel's epilogue: ``relu?(conv * mask + residual)``,
    e.g. a ResNet block's shortcut.
    ``input_mask``: bool (C_in, H_in, W_in) or (1, H_in, W_in), True = kept: the input's
    entries where it is False count as 0, values and gradients: the result is
    ``F.conv2d(input * input_mask, ...) * mask``, and the input's gradient is 0 there. For a
    conv whose input is zero there anyway (the output of a masked unit, ``act(mask * ...)``).
    The CPU kernels skip those inputs; the others multiply them out.
    ``input_index``: optional precomputed ``rk.kept_index(input_mask, C_in)`` (else built once per
    mask tensor and cached); layers pass theirs. Checked against the input mask as ``kept_index``
    is against the mask.
    ``channel_stats``: also return, per output channel, the float64 sum and sum of squares of
    the output over the batch and the kept positions, computed in the same pass (BN
    statistics over kept positions, ``bn_stats="kept"``): ``(output, sum, sum_of_squares)``.
    Inside ``torch.autocast`` the floating-point arguments (not float64) are cast to the autocast
    dtype first, as ``F.conv2d``'s are, and the output is in that dtype; on the CPU, where the
    float32 kernels serve (and for "auto", pay off), they compute from the float32 arguments
    and the output is cast to the autocast dtype (``float32_kernels_under_autocast``).
    ``backend``: "auto", "reference" (the oracle), "cpu" (the C++ CPU kernels), "cuda" (the
    CUDA C++ kernels, when built) or "triton" (the Triton kernels: CUDA tensors, and CPU
    tensors under ``TRITON_INTERPRET=1``); "auto" takes the device's compiled kernels where
    they pay off (rmask_kernels/backends.py), else the reference. A backend that cannot serve
    the tensor falls back to the reference with a warning.
    """
    check_backend(backend)
    # This function reads each tensor attribute once (input.shape again after the unsqueeze): with cold
    # caches (a layer between other layers) every read costs microseconds.
    dims = input.dim() if isinstance(input, torch.Tensor) else None
    if dims not in (3, 4):
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"input must be a 4-D (N, C, H, W) or unbatched 3-D (C, H, W) tensor, got {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-D (C_out, C_in/groups, kh, kw) tensor, got {shape}")
    # Inside torch.autocast: the arguments cast as F.conv2d's are (rmask_kernels/autocast.py), or
    # on the CPU, where the float32 kernels serve, computed by them and returned in the autocast dtype.
    device_type = input.device.type
    autocast_to = autocast_dtype(device_type)
    if autocast_to is not None and float32_kernels_under_autocast(
        autocast_to, backend, input, weight, bias, mask, kept_index, groups, residual
    ):
        with torch.autocast(device_type, enabled=False):
            result = masked_conv2d(
                *(cast(t, torch.float32) for t in (input, weight, bias)), mask, stride, padding, dilation, groups,
                backend="cpu", kept_index=kept_index, relu=relu, channel_stats=channel_stats,
                residual=cast(residual, torch.float32), input_mask=input_mask, input_index=input_index,
            )
        return (result[0].to(autocast_to), *result[1:]) if channel_stats else result.to(autocast_to)
    if autocast_to is not None:
        input, weight, bias, residual = (cast(t, autocast_to) for t in (input, weight, bias, residual))
    dtype, device, weight_shape = input.dtype, input.device, weight.shape
    out_channels = weight_shape[0]
    if not dtype.is_floating_point:
        raise TypeError(f"input must be a floating point tensor, got dtype {dtype}")
    if weight.dtype != dtype:
        raise TypeError(f"weight dtype must match input dtype {dtype}, got {weight.dtype}")
    if bias is not None and (bias.dtype != dtype or tuple(bias.shape) != (out_channels,)):
        raise ValueError(
            f"bias must be a {dtype} tensor of shape ({out_channels},), got {bias.dtype} {tuple(bias.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias), ("mask", mask)):
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"{name} must be on the input's device {device}, got {tensor.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    in_channels = input.shape[-3]
    if in_channels != weight_shape[1] * groups or out_channels % groups:
        raise ValueError(
            f"input has {in_channels} channels but weight {tuple(weight_shape)} with groups={groups} expects "
            f"{weight_shape[1] * groups} (and C_out divisible by groups)"
        )
    if mask is None:
        raise TypeError("mask is required: a bool tensor (C_out or 1, H_out, W_out), e.g. rk.random_mask(...)")
    if channel_stats and (relu or residual is not None):
        raise ValueError(
            "channel_stats cannot be combined with relu or residual: the statistics are of the convolution's output"
        )

    unbatched = dims == 3
    if unbatched:
        input = input.unsqueeze(0)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if min(stride) <= 0 or min(dilation) <= 0:
        raise ValueError(f"stride and dilation must be positive, got stride={stride}, dilation={dilation}")
    kernel_size = tuple(weight_shape[2:])
    top, bottom, left, right = resolve_padding(padding, kernel_size, stride, dilation)
    batch, _, *size = input.shape
    if input_mask is not None:
        check_input_mask(input_mask, in_channels, size, device)
        if input_index is not None:
            input_index = checked_kept_index(input_index, input_mask, in_channels, "input_index")
    elif input_index is not None:
        raise ValueError("input_index is the index of an input_mask, got it without one")
    out_size = conv_output_size(size, kernel_size, stride, (top, bottom, left, right), dilation)
    if min(out_size) <= 0:
        raise ValueError(f"input of spatial size {tuple(size)} is too small for kernel {kernel_size}")
    check_mask_for_output(mask, out_channels, out_size)
    if kept_index is not None:
        kept_index = checked_kept_index(kept_index, mask, out_channels)
    if residual is not None:
        expected = (out_channels, *out_size) if unbatched else (batch, out_channels, *out_size)
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != expected:
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"residual must have the output's shape {expected}, got {shape}")
        if residual.dtype != dtype or residual.device != device:
            raise ValueError(
                f"residual must be a {dtype} tensor on {device}, got {residual.dtype} on {residual.device}"
            )
        residual = residual.unsqueeze(0) if unbatched else residual
    if top != bottom or left != right:
        # Asymmetric "same" padding: pad the extra row/column explicitly, as F.conv2d does
        # (the masked input, then: the mask has the unpadded size).
        if input_mask is not None:
            input, input_mask, input_index = input * input_mask, None, None
        input = F.pad(input, (0, right - left, 0, bottom - top))
    padding2 = (top, left)

    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, residual)
    )
    chosen = select_backend(backend, input, mask, kept_index, out_channels, groups, with_grad, kernel_size[0])
    conv_args = (stride, padding2, dilation, groups)
    if chosen == "reference":
        if input_mask is not None:
            input = input * input_mask
        output = reference.masked_conv2d(input, weight, bias, mask, *conv_args)
        output = output + residual if residual is not None else output
        output = F.relu(output) if relu else output
        if channel_stats:
            stats = reference.channel_stats(output)
    else:
        index = kept_index if kept_index is not None else cached_kept_index(mask, out_channels)
        input_lists = (None, None)
        if input_mask is not None:
            if input_index is None:
                input_index = cached_kept_index(input_mask, in_channels)
            input_lists = (input_index[2], input_index[3])  # its by-position lists
        conv_op, stats_op = kernel_ops(chosen)
        # Nothing to differentiate: straight to the backend's kernel, past the op's autograd
        # kernel (torch.library's, in Python, rmask_kernels/ops.py), which would only do the
        # same after a round trip of every argument through Python: ~5 us a call, ~27 us with
        # cold caches. torch.compile traces the op as it is.
        compiling = torch.compiler.is_compiling()
        below_autograd = not with_grad and not compiling
        # The arguments are cast already: past the op's autocast kernel (Python) too.
        past_autocast = autocast_to is not None and not compiling
        with torch._C._AutoDispatchBelowAutograd() if below_autograd else contextlib.nullcontext(), \
                autocast_excluded(device_type) if past_autocast else contextlib.nullcontext():
            if channel_stats:
                output, *stats = stats_op(input, weight, bias, mask, *index, *conv_args, input_mask, *input_lists)
            else:
                output = conv_op(
                    input, weight, bias, mask, *index, *conv_args, residual, input_mask, *input_lists, relu=bool(relu)
                )
    output = output.squeeze(0) if unbatched else output
    return (output, *stats) if channel_stats else output
