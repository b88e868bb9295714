"""Compile every Triton kernel for a GPU target without a GPU (Triton's ahead-of-time path:
ttir -> ttgir -> llir -> ptx -> cubin with the bundled ptxas). The interpreter runs the kernels'
logic on CPU tensors but never lowers them, so this catches what only the GPU compiler rejects.
Each compiled kernel prints one line with its resource usage as the bundled cuobjdump reads it
from the cubin: `KERNEL DTYPE sm_XX regs=N stack=M` (stack: bytes of local memory per thread,
the registers spilled); --max-stack M fails listing every kernel with a larger stack.

    python tests/triton_compile.py [--arch 90] [--all] [--max-stack 0]

Run with TRITON_INTERPRET unset (tests/test_triton.py does, in a subprocess)."""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from rmask_kernels.triton import interpreting  # imports no triton

if interpreting():
    sys.exit("tests/triton_compile.py: unset TRITON_INTERPRET (the kernels must be defined for the GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rmask_kernels.triton import configs, forward_kernels, grad_input_kernels, grad_weight_kernels  # noqa: E402

INDEX = {"kept_offsets_ptr", "kept_positions_ptr", "tile_ends_ptr", "segments_ptr", "position_offsets_ptr",
         "position_channels_ptr"}
# The operands' dtype as Triton names it (tf32: fp32 operands, TF32 dots), and as torch does.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
FP32 = {"sums_ptr", "squares_ptr", "partial_ptr", "grad_buffer_ptr", "pairs_ptr", "grad_weight_ptr"}


def signature(fn, dtype, constexprs):
    """Argument types as a launch gives them: integers int32 where the offsets fit (INDEX int32:
    every integer argument is below 2**31), else int64."""
    scalar = "i32" if constexprs.get("INDEX") == tl.int32 else "i64"
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = "fp32" if dtype == "tf32" or name in FP32 else dtype
            types[name] = "*i64" if name in INDEX else "*u8" if name == "mask_ptr" else f"*{element}"
        else:
            types[name] = scalar
    return types


def family_jobs(family, config, everything):
    """(kernel, constexprs, launch options) of `family` with `config`'s blocks, as its launcher
    gives them: the most demanding variant of each kernel, or every variant."""
    blocks = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    options = config.launch_options()
    variants = [(1, False), (4, False), (1, True)] if everything else [(4, False), (1, True)]
    gates = [False, True] if everything else [True]
    if family == "forward":
        for pattern_block, all_positions in variants:
            for stats in ([True, False] if everything else [pattern_block == 4]):
                yield forward_kernels.forward_by_pattern_kernel, dict(
                    PATTERN_BLOCK=pattern_block, ALL_POSITIONS=all_positions, HAS_BIAS=True,
                    HAS_RESIDUAL=not stats, RELU=not stats, STATS=stats, **blocks), options
        for stats in [True, False] if everything else [False]:
            yield forward_kernels.forward_by_position_kernel, dict(
                HAS_BIAS=True, HAS_RESIDUAL=not stats, RELU=not stats, STATS=stats, **blocks), options
    elif family == "grad_input":
        for gated in gates:
            yield grad_input_kernels.grad_input_by_tap_kernel, dict(GATED=gated, **blocks), options
            yield grad_input_kernels.grad_input_by_position_kernel, dict(GATED=gated, **blocks), options
            for per_channel in [True, False] if everything else [True]:
                yield grad_input_kernels.grad_input_gather_kernel, dict(
                    MASK_PER_CHANNEL=per_channel, GATED=gated, **blocks), options
    elif family == "grad_weight":
        for gated in gates:
            for pattern_block, all_positions in variants:
                yield grad_weight_kernels.grad_weight_partial_kernel, dict(
                    PATTERN_BLOCK=pattern_block, ALL_POSITIONS=all_positions, GATED=gated, **blocks), options
    else:
        for gated in gates:
            yield grad_weight_kernels.grad_weight_pairs_kernel, dict(
                GATED=gated, BLOCK_M=config.block_n, BLOCK_N=config.block_m, BLOCK_K=config.block_k), options
        yield grad_weight_kernels.grad_weight_sum_pairs_kernel, dict(CHANNEL_BLOCK=64, BLOCK_K=config.block_k), dict(
            num_warps=config.num_warps)


def jobs(everything, dtype, precision, wide):
    """(kernel, constexprs, launch options, config) for every config of every family that
    operands of `dtype` with `precision` take (configs.CONFIGS, or WIDE_CONFIGS for int64
    offsets), each job once."""
    seen = set()
    operands = configs.operand_class(DTYPES[dtype], precision)
    for family in configs.FAMILIES:
        for config in configs.candidates(family, operands, wide):
            for fn, constexprs, options in family_jobs(family, config, everything):
                job = (fn.__name__, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
                if job not in seen:
                    seen.add(job)
                    yield fn, constexprs, options, config


def resource_usage(cubin):
    """(registers, stack bytes) of the one kernel in `cubin`, read by Triton's bundled cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([cuobjdump, "-res-usage", file.name], check=True, capture_output=True,
                              text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", text)
    assert usage, f"no resource usage in cuobjdump's output: {text}"
    return int(usage.group(1)), int(usage.group(2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--all", action="store_true",
                        help="every variant, fp32 (strict, TF32) and fp16 too (default: bf16, strict fp32, a few)")
    parser.add_argument("--wide", action="store_true",
                        help="the int64-offset variants and their configs (tensors of 2**31 elements or more)")
    parser.add_argument("--max-stack", type=int, default=None,
                        help="fail if a kernel uses more bytes of stack (spilled registers) than this")
    args = parser.parse_args(argv)
    over = []
    target = GPUTarget("cuda", args.arch, 32)
    for dtype in ("bf16", "fp32", "tf32", "fp16") if args.all else ("bf16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for fn, constexprs, launch_options, config in jobs(args.all, dtype, precision, args.wide):
            constexprs = dict(constexprs, KH=3, KW=3, INDEX=tl.int64 if args.wide else tl.int32, INTERPRETER=False,
                              PRECISION=precision)
            constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs), target=target,
                                      options=launch_options)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
            registers, stack = resource_usage(compiled.asm["cubin"])
            variant = ",".join(f"{name}={value}" for name, value in sorted(constexprs.items())
                               if name not in ("KH", "KW", "INDEX", "INTERPRETER", "PRECISION")
                               and not name.startswith("BLOCK_"))
            line = f"{fn.__name__} {dtype} sm_{args.arch} regs={registers} stack={stack}"
            described = f"{line} [{config}] [{variant}]"
            print(f"{described} ({time.perf_counter() - start:.1f}s)", flush=True)
            if args.max_stack is not None and stack > args.max_stack:
                over.append(described)
    if over:
        sys.exit(f"{len(over)} kernel(s) with more than {args.max_stack} bytes of stack:\n" + "\n".join(over))
    print("ok")


if __name__ == "__main__":
    main()
