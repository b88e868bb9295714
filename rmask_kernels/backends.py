"""Which implementation runs a masked conv for a given tensor."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import ops

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_warned = set()


def _cuda_kernels_registered() -> bool:
    """Whether the extension was built with its CUDA kernels (csrc/cuda): the one place that asks."""
    return ops.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("rmask::masked_conv2d", "CUDA")


# Read once at import: plain values are also what torch.compile can trace through. Finding
# triton does not import it (rmask_kernels/triton imports it on the first call).
CUDA_KERNELS = _cuda_kernels_registered()
TRITON_INSTALLED = ops.extension_loaded() and importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    """Whether ``TRITON_INTERPRET=1``: the Triton backend then also serves CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list:
    """Backends usable in this process: "reference" always; "cpu" when the extension is built
    (``cpu_kernels()`` tells which CPU kernels it runs); "cuda" when it was built with its CUDA
    kernels; "triton" when it is built and triton is installed (CUDA tensors, and CPU tensors
    under ``TRITON_INTERPRET=1``)."""
    names = ["reference"]
    if ops.extension_loaded():
        names.append("cpu")
    if CUDA_KERNELS:
        names.append("cuda")
    if TRITON_INSTALLED:
        names.append("triton")
    return names


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _serves(backend: str, tensor: torch.Tensor) -> str | None:
    """None if ``backend`` can run on ``tensor``, else why not."""
    if backend == "reference":
        return None
    if backend not in available_backends():
        reason = f"not available in this build (available: {available_backends()})"
        if backend == "cpu" and ops.EXTENSION_ERROR is not None:
            reason += f"; the extension failed to load: {ops.EXTENSION_ERROR}"
        return reason
    if backend == "cpu" and tensor.device.type != "cpu":
        return f"runs on CPU tensors, got a tensor on {tensor.device}"
    if backend == "cuda" and tensor.device.type != "cuda":
        return f"runs on CUDA tensors, got a tensor on {tensor.device}"
    if backend == "triton":
        # The device first: on CUDA tensors nothing else is read (torch.compile traces this).
        if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and triton_interpreter()):
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


def batch_vector_kernels(dtype: torch.dtype, groups: int) -> bool:
    """Whether the CPU op runs the batch-vector kernels (csrc/cpu/batch_vector.h) for
    these arguments; otherwise it runs the portable gather-GEMM-scatter kernels."""
    return dtype == torch.float32 and groups == 1 and CPU_KERNELS in ("avx2", "avx512")


# When "auto" takes the CPU kernel instead of dense conv × mask, from a measured crossover
# (2 threads, fp32, batch 32, the paper's 3x3 shapes; `benchmarks/op_times.py --speedup` and
# `make bench`, side by side, benchmarks/NOTES.md). The batch-vector kernels cost what their kept outputs cost plus a
# fixed part (laying the input out batch-last, writing the whole output), so they win below
# a kept fraction:
#   avx512 (Xeon, 2 cores, oneDNN dense at ~360 GFLOP/s): forced at keep 0.5 forward 1.06-1.59x,
#     fwd+bwd 1.23-1.78x; at keep 0.7 forward 0.84-1.20x (break-even), fwd+bwd 1.02-1.47x; at
#     keep 1.0 forward 0.72-1.19x. Taken up to keep 0.6: a forward win, a training win.
#   avx2 (measured on that Xeon with both sides held to AVX2: ATEN_CPU_CAPABILITY=avx2
#     ONEDNN_MAX_CPU_ISA=AVX2): forward 1.5-2.1x at keep 0.5, 1.17-1.56x at keep 0.7,
#     0.90-1.14x at keep 1.0; fwd+bwd 1.17-1.39x at keep 0.7, 0.82-0.90x at keep 1.0.
#     Taken up to keep 0.75. (Step 1's 0.45, from an AMD Zen 3 VM, predates the kernels
#     running on both threads.)
# Their cost scales with the batch rounded up to 16 images (the SIMD padding), so a small
# batch needs a sparser mask.
# Spatial masks (one pattern for all channels) take the per-image kernels instead
# (forward_positions / backward_positions: no batch-wide layout step, channels in the lanes,
# no batch padding), which stay ahead of dense conv much longer: avx512 forward 1.12-1.91x
# and fwd+bwd 1.21-1.59x at keep 0.8, 1.04-1.31x / 0.96-1.44x at keep 0.9, 0.96-1.00x /
# 0.99-1.23x at keep 1.0; avx2 (both sides held to AVX2) 1.12-1.40x / 1.01-1.42x at keep
# 0.8, 1.00-1.09x / 0.91-1.05x at keep 0.9. Taken up to keep 0.85 (avx512) and 0.8 (avx2). The portable kernels gather columns once per mask pattern:
# only few patterns (spatial, coarse groups) at keep <= 0.2 pay off.
BATCH_VECTOR_MAX_KEEP = {"avx512": 0.6, "avx2": 0.75}
SPATIAL_MAX_KEEP = {"avx512": 0.85, "avx2": 0.8}
PORTABLE_MAX_KEEP = 0.2
PORTABLE_MAX_PATTERNS = 4


# GPU backends (triton, cuda) under "auto": the masked kernel whenever anything is masked,
# dense conv × mask (the reference, cuDNN) when nothing is (keep 1.0), where a masked kernel
# can only match cuDNN. The crossover keep fraction on a GPU is unmeasured (no GPU was lent
# yet; benchmarks/gpu_times.py measures it): refine this rule from its table.
def gpu_sparse_pays_off(index, positions_per_pattern: int) -> bool:
    patterns = index.offsets.numel() - 1
    return index.positions.numel() < patterns * positions_per_pattern


def sparse_pays_off(index, positions_per_pattern: int, batch: int, dtype: torch.dtype, groups: int) -> bool:
    """Whether the CPU kernels beat dense conv × mask here (the measured rule above)."""
    patterns = index.offsets.numel() - 1
    keep = index.positions.numel() / max(1, patterns * positions_per_pattern)
    if batch_vector_kernels(dtype, groups):
        if patterns == 1:  # every channel kept at the same positions: the per-image kernels
            return keep <= SPATIAL_MAX_KEEP[CPU_KERNELS]
        lanes = -(-max(batch, 1) // 16) * 16
        return keep * lanes / max(batch, 1) <= BATCH_VECTOR_MAX_KEEP[CPU_KERNELS]
    return patterns <= PORTABLE_MAX_PATTERNS and keep <= PORTABLE_MAX_KEEP
