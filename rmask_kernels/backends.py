"""Which implementation runs a masked conv for a given tensor."""

from __future__ import annotations

import warnings

import torch

from . import ops

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_warned = set()


def available_backends() -> list:
    """Backends usable in this process: "reference" always, "cpu" when the extension is built."""
    names = ["reference"]
    if ops.extension_loaded():
        names.append("cpu")
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
    return None


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend that will run: the requested one, or the reference with a warning (once)."""
    check_backend(backend)
    if backend == "auto":
        for candidate in ("cpu",):
            if _serves(candidate, tensor) is None:
                return candidate
        return "reference"
    reason = _serves(backend, tensor)
    if reason is None:
        return backend
    key = (backend, tensor.device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"rmask_kernels: backend={backend!r} {reason}; falling back to the reference path.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


# The gather-GEMM-scatter CPU kernel pays a gather per mask pattern, so "auto" takes it only
# where that is measured to beat dense conv × mask: few patterns (spatial, coarse groups)
# and few kept outputs. Measured (2 threads, fp32, N=32, 3x3; command and table in
# benchmarks/NOTES.md): spatial keep 0.1 1.6-2.9x faster, keep 0.5 2.2x slower; neuron
# masks (one gather per channel) 10-100x slower. The fast kernels replace this rule with a
# per-shape crossover.
SPARSE_MAX_KEEP = 0.2
SPARSE_MAX_PATTERNS = 4


def sparse_pays_off(kept_offsets: torch.Tensor, kept_positions: torch.Tensor, positions_per_pattern: int) -> bool:
    patterns = kept_offsets.numel() - 1
    keep = kept_positions.numel() / max(1, patterns * positions_per_pattern)
    return patterns <= SPARSE_MAX_PATTERNS and keep <= SPARSE_MAX_KEEP
