"""Compile every Triton kernel for a GPU target without a GPU (Triton's ahead-of-time path:
ttir -> ttgir -> llir -> ptx -> cubin with the bundled ptxas). The interpreter runs the kernels'
logic on CPU tensors but never lowers them, so this catches what only the GPU compiler rejects.

    python tests/triton_compile.py [--arch 90] [--all]

Run with TRITON_INTERPRET unset (tests/test_triton.py does, in a subprocess)."""

import argparse
import sys
import time

from rmask_kernels.triton import interpreting  # imports no triton

if interpreting():
    sys.exit("tests/triton_compile.py: unset TRITON_INTERPRET (the kernels must be defined for the GPU)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rmask_kernels.triton import common, forward_kernels, grad_input_kernels, grad_weight_kernels  # noqa: E402

INDEX = {"kept_offsets_ptr", "kept_positions_ptr", "tile_ends_ptr", "segments_ptr", "position_offsets_ptr",
         "position_channels_ptr"}
FP32 = {"sums_ptr", "squares_ptr", "partial_ptr", "grad_buffer_ptr", "pairs_ptr", "grad_weight_ptr"}


def signature(fn, dtype, constexprs):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*i64" if name in INDEX else "*u8" if name == "mask_ptr" else "*fp32" if name in FP32 else f"*{dtype}"
        else:
            types[name] = "i64"
    return types


def jobs(everything):
    """(kernel, constexprs): the most demanding variant of each kernel, or every variant."""
    blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    variants = [(1, False), (4, False), (1, True)] if everything else [(4, False), (1, True)]
    for pattern_block, all_positions in variants:
        for stats in ([True, False] if everything else [pattern_block == 4]):
            yield forward_kernels.forward_by_pattern_kernel, dict(
                PATTERN_BLOCK=pattern_block, ALL_POSITIONS=all_positions, HAS_BIAS=True, HAS_RESIDUAL=not stats,
                RELU=not stats, STATS=stats, **blocks)
        yield grad_weight_kernels.grad_weight_partial_kernel, dict(
            PATTERN_BLOCK=pattern_block, ALL_POSITIONS=all_positions, **blocks)
    for stats in [True, False] if everything else [False]:
        yield forward_kernels.forward_by_position_kernel, dict(
            HAS_BIAS=True, HAS_RESIDUAL=not stats, RELU=not stats, STATS=stats, BLOCK_M=32, BLOCK_N=16, BLOCK_K=32)
    yield grad_input_kernels.grad_input_by_tap_kernel, dict(**blocks)
    yield grad_weight_kernels.grad_weight_pairs_kernel, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    yield grad_weight_kernels.grad_weight_sum_pairs_kernel, dict(CHANNEL_BLOCK=64, BLOCK_K=32)
    yield grad_input_kernels.grad_input_by_position_kernel, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16)
    for per_channel in [True, False] if everything else [True]:
        yield grad_input_kernels.grad_input_gather_kernel, dict(MASK_PER_CHANNEL=per_channel, **blocks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--all", action="store_true", help="every variant, fp32 and fp16 too (default: bf16, a few)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    for dtype in ("bf16", "fp32", "fp16") if args.all else ("bf16",):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for fn, constexprs in jobs(args.all):
            constexprs = dict(constexprs, KH=3, KW=3, INTERPRETER=False, PRECISION=precision)
            constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs), target=target,
                                      options=dict(num_warps=common.NUM_WARPS))
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
            print(f"compiled {fn.__name__} {dtype} sm_{args.arch} in {time.perf_counter() - start:.1f}s", flush=True)
    print("ok")


if __name__ == "__main__":
    main()
