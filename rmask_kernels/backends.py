"""Which implementation runs a masked conv for a given tensor."""

from __future__ import annotations

import importlib.util
import warnings

import torch

from . import ops
from .triton import interpreting

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_warned = set()


def _cuda_kernels_registered() -> bool:
    """Whether the extension was built with its CUDA kernels (csrc/cuda): the one place that asks."""
    return ops.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("rmask::masked_conv2d", "CUDA")


# Read once at import: plain values are also what torch.compile can trace through. Finding
# triton does not import it (rmask_kernels/triton imports it on the first call). The Triton
# ops are defined with or without the extension (rmask_kernels/ops.py).
CUDA_KERNELS = _cuda_kernels_registered()
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


# Found once at import (the extension, its CUDA kernels, triton): each call reads this tuple.
AVAILABLE = tuple(
    name
    for name, present in (("reference", True), ("cpu", ops.extension_loaded()), ("cuda", CUDA_KERNELS),
                          ("triton", TRITON_INSTALLED))
    if present
)


def available_backends() -> list:
    """Backends usable in this process: "reference" always; "cpu" when the extension is built
    (``cpu_kernels()`` tells which CPU kernels it runs); "cuda" when it was built with its CUDA
    kernels; "triton" when triton is installed (CUDA tensors, and CPU tensors under
    ``TRITON_INTERPRET=1``), with or without the extension."""
    return list(AVAILABLE)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _serves(backend: str, tensor: torch.Tensor) -> str | None:
    """None if ``backend`` can run on ``tensor``, else why not."""
    if backend == "reference":
        return None
    if backend not in AVAILABLE:
        reason = f"not available in this build (available: {list(AVAILABLE)})"
        if backend == "cpu" and ops.EXTENSION_ERROR is not None:
            reason += f"; the extension failed to load: {ops.EXTENSION_ERROR}"
        return reason
    device = tensor.device.type
    if backend == "cpu" and device != "cpu":
        return f"runs on CPU tensors, got a tensor on {tensor.device}"
    if backend == "cuda" and device != "cuda":
        return f"runs on CUDA tensors, got a tensor on {tensor.device}"
    if backend == "triton":
        # The device first: on CUDA tensors nothing else is read (torch.compile traces this).
        if device != "cuda" and not (device == "cpu" and interpreting()):
            return f"runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got a tensor on {tensor.device}"
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"runs float32, float16 and bfloat16, got {tensor.dtype}"
    return None


# "auto" by device: CPU tensors take the CPU kernels; CUDA tensors the Triton kernels if
# triton is installed, else the CUDA C++ kernels if built (each then subject to
# sparse_pays_off / gpu_sparse_pays_off), else the reference. The interpreter never takes
# "auto": it is for testing the Triton kernels, not for speed.
AUTO_CANDIDATES = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend that will run: the requested one, or the reference with a warning (once)."""
    check_backend(backend)
    if backend == "auto":
        for candidate in AUTO_CANDIDATES.get(tensor.device.type, ()):
            if _serves(candidate, tensor) is None:
                return candidate
        return "reference"
    reason = _serves(backend, tensor)
    if reason is None:
        return backend
    key = (backend, tensor.device.type, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"rmask_kernels: backend={backend!r} {reason}; falling back to the reference path.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


# Read once: a plain value is also what torch.compile can trace through (the op is not).
CPU_KERNELS = torch.ops.rmask.cpu_kernels() if ops.extension_loaded() else None


def cpu_kernels() -> str | None:
    """The compiled CPU kernels that serve float32 for backend "cpu" in this process (the GPU
    backends are listed by ``available_backends()``): "avx512" or "avx2" (the
    batch-vector kernels, csrc/cpu/batch_vector.h, chosen by ATen's CPU capability, so
    ``ATEN_CPU_CAPABILITY=avx2`` selects AVX2 on an AVX-512 CPU), "portable" (the
    gather-GEMM-scatter kernels) or None without the extension."""
    return CPU_KERNELS


def cpu_output_cache() -> dict:
    """The CPU kernels' output cache (csrc/cpu/output_cache.h): ``{"cached_bytes", "limit_bytes"}``.
    Large outputs freed by one call are reused, already mapped, by the next call of that size
    (a fresh multi-MB tensor page-faults on first write); ``RMASK_CPU_CACHE_MB`` (read at
    start-up, default 256, 0 = off) bounds the bytes it keeps."""
    if not ops.extension_loaded():
        return {"cached_bytes": 0, "limit_bytes": 0}
    cached, limit = torch.ops.rmask.cpu_output_cache()
    return {"cached_bytes": cached, "limit_bytes": limit}


# The extension's answers to cpu_uses_batch_vector, by (dtype, groups, batch > 0, kernel height):
# the rule is stated once, in C++ (csrc/cpu/batch_vector_driver.cpp); each distinct key asks once.
_BATCH_VECTOR_ANSWERS: dict = {}


def batch_vector_kernels(dtype: torch.dtype, groups: int, batch: int, kernel_height: int) -> bool:
    """Whether the CPU op runs the batch-vector kernels (csrc/cpu/batch_vector.h) for these
    arguments; otherwise it runs the portable gather-GEMM-scatter kernels."""
    if CPU_KERNELS not in ("avx2", "avx512"):
        return False
    key = (dtype, groups, batch > 0, kernel_height)
    answer = _BATCH_VECTOR_ANSWERS.get(key)
    if answer is None:
        answer = _BATCH_VECTOR_ANSWERS[key] = _ask_batch_vector(dtype, groups, int(batch > 0), kernel_height)
    return answer


def _ask_batch_vector(dtype, groups, batch, kernel_height) -> bool:
    return bool(torch.ops.rmask.cpu_uses_batch_vector(dtype, groups, batch, kernel_height))


# A constant of the process for given arguments: torch.compile calls it while tracing and keeps
# the answer (an op returning a bool cannot be put in a graph). This is what
# torch.compiler.assume_constant_result does; calling that would import torch._dynamo, and with
# it triton, when rmask_kernels is imported (tests: test_triton.py's import test, and the
# fullgraph compile of an "auto" layer in test_autocast.py, which fails if this mark stops working).
_ask_batch_vector._dynamo_marked_constant = True


# When "auto" takes the CPU kernels instead of dense conv × mask. The kernels cost what their
# kept outputs cost plus a fixed part (laying the input out, writing the whole output), so
# they win below a kept fraction; their backward wins further than their forward (oneDNN's
# dense backward is slower than its forward), so a call that will be differentiated (grad
# enabled and an input requiring it) takes the forward + backward limit. Nothing masked
# (keep 1.0) always takes dense conv. Each limit, per kernel set, is the highest keep at which
# the kernels beat dense conv × mask on the three target shapes (2 threads, fp32, batch 32;
# crossover measured side by side with `benchmarks/op_times.py --speedup`; see docs/design.md).
# Spatial masks (one pattern) take the per-image kernels, which pad no batch: a higher limit
# at any batch. The batch-vector kernels' cost, fixed part included, scales with the batch
# rounded up to 16 SIMD lanes, dense conv's with the batch itself: with the fixed part F
# (relative to the arithmetic at keep 1.0) they win where
# lanes * (F + keep) <= batch * (F + limit). F = 0.05 fits the crossovers measured at batches
# 2 to 8 (`op_times.py --batch B --speedup`); at batch 1 nothing masked pays for the 15 empty
# lanes. The portable kernels gather columns once per mask pattern: only few patterns
# (spatial, coarse groups) at keep <= 0.2 pay off.
BATCH_VECTOR_MAX_KEEP = {"avx512": 0.75, "avx2": 0.85}
BATCH_VECTOR_MAX_KEEP_WITH_GRAD = {"avx512": 0.85, "avx2": 0.9}
BATCH_VECTOR_FIXED = 0.05
SPATIAL_MAX_KEEP = {"avx512": 0.9, "avx2": 0.85}
SPATIAL_MAX_KEEP_WITH_GRAD = {"avx512": 0.95, "avx2": 0.9}
PORTABLE_MAX_KEEP = 0.2
PORTABLE_MAX_PATTERNS = 4

# Under CPU autocast the float32 kernels race the dense conv in bfloat16, which oneDNN runs
# natively where the CPU has bfloat16 dot products (AVX512-BF16, AMX): about twice its float32
# speed, so the kernels pay off only to lower keeps. The limits are the highest keep at which
# they do not lose on any of the three target shapes (interpolated between keep 0.1 and 0.5,
# benchmarks/investigations/autocast_cpu.py [--backward], AVX-512 with BF16, 2 threads, batch
# 32; docs/design.md). Without native bfloat16, and for float16, the dense low-precision conv
# is no faster than float32's: the float32 limits hold.
AUTOCAST_BF16_MAX_KEEP = {"rows": 0.3, "spatial": 0.45}
AUTOCAST_BF16_MAX_KEEP_WITH_GRAD = {"rows": 0.45, "spatial": 0.45}
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# GPU backends (triton, cuda) under "auto": the masked kernel whenever anything is masked,
# dense conv × mask (the reference, cuDNN) when nothing is (keep 1.0), where a masked kernel
# can only match cuDNN. The GPU crossover keep fraction is not measured yet
# (benchmarks/gpu_times.py measures it): refine this rule from its table.
def gpu_sparse_pays_off(index, positions_per_pattern: int) -> bool:
    patterns = index.offsets.numel() - 1
    return index.positions.numel() < patterns * positions_per_pattern


def sparse_pays_off(
    index,
    positions_per_pattern: int,
    batch: int,
    dtype: torch.dtype,
    groups: int,
    kernel_height: int,
    with_grad: bool = False,
    dense_dtype: torch.dtype | None = None,
) -> bool:
    """Whether the CPU kernels beat dense conv × mask here (the measured rule above);
    ``with_grad``: the call will be differentiated, so forward + backward is what counts;
    ``dense_dtype``: the dense conv would run in this dtype (autocast's), not in ``dtype``."""
    patterns = index.offsets.numel() - 1
    keep = index.positions.numel() / max(1, patterns * positions_per_pattern)
    if batch_vector_kernels(dtype, groups, batch, kernel_height):
        if keep >= 1.0:
            return False
        if dense_dtype == torch.bfloat16 and NATIVE_BF16:
            autocast_limits = AUTOCAST_BF16_MAX_KEEP_WITH_GRAD if with_grad else AUTOCAST_BF16_MAX_KEEP
            spatial_limit, rows_limit = autocast_limits["spatial"], autocast_limits["rows"]
        else:
            spatial_limit = (SPATIAL_MAX_KEEP_WITH_GRAD if with_grad else SPATIAL_MAX_KEEP)[CPU_KERNELS]
            rows_limit = (BATCH_VECTOR_MAX_KEEP_WITH_GRAD if with_grad else BATCH_VECTOR_MAX_KEEP)[CPU_KERNELS]
        if patterns == 1:  # every channel kept at the same positions: the per-image kernels
            return keep <= spatial_limit
        lanes = -(-max(batch, 1) // 16) * 16
        return lanes * (BATCH_VECTOR_FIXED + keep) <= max(batch, 1) * (BATCH_VECTOR_FIXED + rows_limit)
    return patterns <= PORTABLE_MAX_PATTERNS and keep <= PORTABLE_MAX_KEEP
