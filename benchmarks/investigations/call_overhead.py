"""The per-call path of a masked conv, hot and with cold caches (not pytest).

    .venv/bin/python benchmarks/investigations/call_overhead.py

A 1-image op (64->128, 3x3 s2 on a 4x4 input) does almost no arithmetic, so its time is the
path a call takes: the Python wrapper (rk.masked_conv2d), the op's dispatch (torch.library's
autograd kernel, in Python, unless the call goes below it), the C++ setup. "Cold" runs each
call after a 64 MB copy has swept the caches, as a layer between other layers finds them.
The numbers and the fixed costs they make up: docs/design.md, section 5.
"""

import pathlib
import sys

import torch
import torch.nn.functional as F

import rmask_kernels as rk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # benchmarks/: side_by_side
from side_by_side import median_ms  # noqa: E402


def main():
    source = torch.randn(8 * 2**20)
    target = torch.empty_like(source)
    x, w, b = torch.randn(1, 64, 4, 4), torch.randn(128, 64, 3, 3), torch.randn(128)
    mask = rk.random_mask((128, 2, 2), 0.5, "spatial", seed=0)
    index = rk.kept_index(mask, 128)
    op_args = (x, w, b, mask, *index, (2, 2), (1, 1), (1, 1), 1, None)

    def below_autograd():
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.rmask.masked_conv2d(*op_args)

    calls = {
        "rk.masked_conv2d": lambda: rk.masked_conv2d(x, w, b, mask, 2, 1, backend="cpu", kept_index=index),
        "torch.ops.rmask.masked_conv2d": lambda: torch.ops.rmask.masked_conv2d(*op_args),
        "  the same below autograd": below_autograd,
        "F.conv2d": lambda: F.conv2d(x, w, b, 2, 1),
    }
    print(f"kernels: {rk.backends.cpu_kernels()}, threads: {torch.get_num_threads()}, no_grad; microseconds")
    with torch.no_grad():
        for name, call in calls.items():
            hot = median_ms(call, 301) * 1e3
            cold = median_ms(call, 151, lambda: target.copy_(source)) * 1e3
            print(f"{name:32s} hot {hot:6.1f}   cold {cold:6.1f}", flush=True)


if __name__ == "__main__":
    main()
