"""The block configurations of the Triton kernels: per launch family (forward, grad input, grad
weight) and operand class a small set, each compiled without spilling registers for sm_80 and
sm_90 (tests/triton_compile.py compiles every one); the rule that picks one per shape class
without measuring; and on a GPU the fastest of the set measured per call shape (choose), cached.

The launchers, not triton.autotune, measure: the by-pattern kernels' host tables (row tiles,
channel segments) and the statistics and grad-weight partials are sized by the block sizes, so
a configuration is timed as the whole launch it implies (`run(config)`, fresh outputs each time).

What a Config's blocks are, per family:
forward, grad_input   a block_m x block_n output tile; block_k input (forward) or output (grad
                      input) channels per tl.dot step
grad_weight           the partials: block_m rows reduced per tl.dot step, block_n output
                      channels, block_k columns (ci, kh, kw) of the weight
grad_weight_pairs     block_m images reduced per step, block_n kept channels of a position,
                      block_k columns
"""

from __future__ import annotations

import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import triton

from .common import INTERPRET

FAMILIES = ("forward", "grad_input", "grad_weight", "grad_weight_pairs")


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # ptxas's register cap per thread (maxnreg); None: its own choice.
    max_registers: Optional[int] = None

    def launch_options(self) -> dict:
        """The options a kernel launch takes besides its constexpr blocks."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers is not None and not INTERPRET:
            options["maxnreg"] = self.max_registers
        return options

    def __str__(self) -> str:
        registers = f" maxnreg={self.max_registers}" if self.max_registers is not None else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} warps={self.num_warps} stages={self.num_stages}{registers}"


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """How tl.dot multiplies: "16bit" (fp16/bf16 tensor cores), "tf32" (fp32 operands on TF32
    tensor cores) or "fp32" (strict fp32: FMA, no tensor cores), which bounds the registers a
    tile of operands takes."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if precision == "tf32" else "fp32"


# The Triton release the kernels compile with: the smallest K tl.dot takes, and with it what
# fits in registers, changed between the releases PyTorch pins (3.6 for torch 2.11, 3.8 for
# 2.14); every config below compiles without spilling on 3.6 to 3.9 (tests/triton_compile.py).
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

# Strict fp32 dots (FMA) take a K block of 8 where tl.dot accepts it (Triton 3.8 on: with 16,
# some kernels spill there), else 16.
_FMA_K = 8 if TRITON_VERSION >= (3, 8) else 16

# The first config of each set is the rule's default: a 64 x 64 fp32 accumulator on 8 warps,
# with a reduction block that shrinks with the operands' registers (32 for 16-bit operands, 16
# for TF32 dots, 8 or 16 for strict fp32: FMA dots). Then a 128-row tile for long row ranges
# and a 32-row one on 4 warps for short ones, each as wide and deep as fits without spilling.
# Launches let ptxas use every register (maxnreg): left to itself it caps some kernels at 128
# and spills. The grad weight's partials reduce over rows (block_m is tl.dot's K there); its
# pairs kernel (block_m images, block_n channels) spills under maxnreg and is launched without.
_GEMM = {
    "16bit": (Config(64, 64, 32, 8, 3, 255), Config(128, 32, 16, 8, 3, 255), Config(32, 64, 16, 4, 3, 255)),
    "tf32": (Config(64, 64, 16, 8, 3, 255), Config(128, 32, 16, 8, 3, 255), Config(32, 64, 8, 4, 3, 255)),
    "fp32": (Config(64, 64, _FMA_K, 8, 3, 255), Config(128, 32, _FMA_K, 8, 3, 255),
             Config(32, 64, _FMA_K, 4, 3, 255)),
}
_PARTIALS = (Config(64, 64, 32, 8, 3, 255), Config(128, 32, 32, 8, 3, 255), Config(32, 64, 32, 4, 3, 255))
_PAIRS = (Config(64, 64, 32, 8, 3), Config(128, 32, 32, 8, 3), Config(64, 32, 32, 4, 3))
CONFIGS: Dict[str, Dict[str, Tuple[Config, ...]]] = {
    "forward": _GEMM,
    "grad_input": _GEMM,
    "grad_weight": {"16bit": _PARTIALS, "tf32": _PARTIALS, "fp32": _PARTIALS},
    "grad_weight_pairs": {"16bit": _PAIRS, "tf32": _PAIRS, "fp32": _PAIRS},
}

# Launches with int64 offsets (tensors of 2**31 elements or more: common.index_type) take more
# registers per address: one config each, smaller tiles, spill-free there too (but for the
# strict-fp32 grad-input gather under Triton 3.6, which spills 24 to 32 bytes in every tile
# tried: docs/design.md).
_WIDE_GEMM = {"16bit": (Config(64, 32, 32, 8, 3, 255),), "tf32": (Config(64, 32, 16, 8, 3, 255),),
              "fp32": (Config(64, 32, _FMA_K, 8, 3, 255),)}
WIDE_CONFIGS: Dict[str, Dict[str, Tuple[Config, ...]]] = {
    "forward": _WIDE_GEMM,
    "grad_input": dict(_WIDE_GEMM, **{"16bit": (Config(64, 32, 16, 8, 3, 255),)}),
    "grad_weight": {operands: (Config(32, 32, 32, 4, 3, 255),) for operands in ("16bit", "tf32", "fp32")},
    "grad_weight_pairs": {operands: _PAIRS[:1] for operands in ("16bit", "tf32", "fp32")},
}

# The interpreter costs ~0.5 ms per program and runs tl.dot as a numpy matmul: big blocks, one
# config for every family (tests replace it to reach small-block code paths).
INTERPRETER_CONFIG = Config(128, 64, 32, 4, 1)

# Whether choose measures: None = on a GPU unless RMASK_TRITON_AUTOTUNE=0 (tuning()); tests set
# True or False.
AUTOTUNE: Optional[bool] = None

_chosen: Dict[tuple, Config] = {}


def candidates(family: str, operands: str, wide: bool = False) -> Tuple[Config, ...]:
    """The set a launch of `family` chooses from: CONFIGS, or WIDE_CONFIGS for int64 offsets."""
    return (WIDE_CONFIGS if wide else CONFIGS)[family][operands]


def rule(family: str, operands: str, rows: int, wide: bool = False) -> Config:
    """The config without measuring: the interpreter's; on a GPU the set's first, unless the
    rows a launch covers (its M extent; the images for the pairs) fill less than half of that
    config's block_m: then the one with the smallest block_m, on the fewest warps."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    configs = candidates(family, operands, wide)
    if 2 * rows < configs[0].block_m:
        return min(configs, key=lambda config: (config.block_m, config.num_warps))
    return configs[0]


def tuning() -> bool:
    """Whether choose measures the set (AUTOTUNE, else automatic): on a GPU, not under
    RMASK_TRITON_AUTOTUNE=0, nor with torch.use_deterministic_algorithms (a measured choice may
    differ between processes, and with it the order of the fp32 sums), nor while a CUDA graph is
    captured (measuring launches work outside the graph)."""
    if AUTOTUNE is not None:
        return AUTOTUNE
    if INTERPRET or os.environ.get("RMASK_TRITON_AUTOTUNE", "1") == "0":
        return False
    if torch.are_deterministic_algorithms_enabled():
        return False
    return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()


def measure(launch: Callable[[], object]) -> float:
    """Milliseconds one `launch()` takes on the GPU (Triton's do_bench: median of repeats)."""
    import triton.testing

    return triton.testing.do_bench(launch, warmup=5, rep=20)


def choose(family: str, operands: str, key: tuple, rows: int, run: Callable[[Config], object],
           wide: bool = False) -> Config:
    """The config a call of `family` takes: when tuning(), the fastest of its candidates as
    measure() times `run(config)` (the whole launch with that config), once per (family,
    operands, wide, key) and cached for the process; otherwise rule(family, operands, rows,
    wide). `key` names what the launch's speed depends on (shapes, strides, index sizes,
    epilogue)."""
    if not tuning():
        return rule(family, operands, rows, wide)
    cache_key = (family, operands, wide) + tuple(key)
    config = _chosen.get(cache_key)
    if config is None:
        config = min(candidates(family, operands, wide), key=lambda candidate: measure(lambda: run(candidate)))
        _chosen[cache_key] = config
    return config


def chosen() -> Dict[str, str]:
    """What choose has measured and kept in this process: call (family, operands, wide, key) ->
    config, as text (benchmarks/gpu_times.py records it)."""
    return {str(key): str(config) for key, config in _chosen.items()}


def launch_key(*tensors, extra=()) -> tuple:
    """A choose key from `tensors` (shape and strides; None for an absent one) and `extra`."""
    return tuple(None if t is None else (tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in tensors) + tuple(extra)
