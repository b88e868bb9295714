"""What every Triton kernel and host launcher of the masked convolution shares: whether the
kernels run in Triton's interpreter, the dtypes, offset types and dot options, and the rounding
of an fp32 result to the output's dtype. Block sizes: configs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

# Triton reads TRITON_INTERPRET when a kernel is defined, and the kernels are defined when this
# module's importers are: the value then is the one that holds for this process.
INTERPRET = interpreting()

# Channels per mask pattern from which the by-pattern kernels fill a tile's N dimension well
# enough; below it (neuron masks, small groups) the by-position kernels take the kept channels
# of each position instead. Untuned on a GPU: tl.dot's smallest N is 16.
MIN_PATTERN_CHANNELS = 16

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Element offsets from here on need 64 bits.
INT32_LIMIT = 2**31


# Triton's interpreter checks every int32 add, sub and mul for overflow (redone in int64, an
# assert per operation), which makes the int32 kernels ~2x slower there than int64 ones: under
# the interpreter the kernels compute offsets in int64 unless this is False (a test sets it to
# run the int32 variants under that check).
INTERPRETER_WIDE = True


def needs_int64(*tensors):
    """Whether an element offset into one of `tensors` (None: absent) can reach INT32_LIMIT."""
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        if max(span, tensor.numel()) >= INT32_LIMIT:
            return True
    return False


def index_type(*tensors):
    """The constexpr INDEX every GEMM kernel takes, the type of its element offsets: tl.int64
    where an offset into one of `tensors` can reach INT32_LIMIT (needs_int64), else tl.int32
    (fewer registers: the kernels' offsets fit, and so do their integer arguments, which Triton
    then passes as int32)."""
    if (INTERPRET and INTERPRETER_WIDE) or needs_int64(*tensors):
        return tl.int64
    return tl.int32


def dot_options(dtype):
    """The constexprs INTERPRETER and PRECISION every kernel takes. Interpreter: tl.dot on bf16
    gives garbage there, so every operand goes up to fp32, and its fp32 -> bf16 conversion
    truncates, so the kernels round to nearest even themselves (cast). GPU, fp32: strict fp32
    unless PyTorch's conv may use TF32 (cudnn.allow_tf32), as F.conv2d."""
    if INTERPRET:
        return dict(INTERPRETER=True, PRECISION="ieee")
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return dict(INTERPRETER=False, PRECISION="tf32" if tf32 else "ieee")


@triton.jit
def cast(value, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 `value` in `dtype`, rounded to nearest even (the interpreter truncates to bf16)."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = value.to(dtype)
    return result


@triton.jit
def load_gradient(grad_pointers, gate_pointers, load_ok, GATED: tl.constexpr):
    """grad_output at `grad_pointers` where `load_ok`, else 0; GATED (a fused ReLU's output at
    `gate_pointers`, the same elements): also 0 where the gate is not > 0, read only where
    load_ok, and grad_output read only where it is open."""
    if GATED:
        gate = tl.load(gate_pointers, mask=load_ok, other=0.0)
        load_ok = load_ok & (gate > 0)
    return tl.load(grad_pointers, mask=load_ok, other=0.0)
