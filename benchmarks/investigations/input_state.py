"""The forced CPU op's time by where its input was last written (not pytest): why a masked
layer inside a model costs more than the same call timed alone (docs/design.md, the output cache).

    .venv/bin/python benchmarks/investigations/input_state.py                  # neuron, keep 0.1, 64->64@32
    .venv/bin/python benchmarks/investigations/input_state.py --mode spatial --keep 0.1

Inside a model, a masked layer's input is the previous layer's output. The kernels write
their outputs with streaming stores (csrc/cpu/batch_vector_impl.h, floats_out), which
leave them in memory rather than in the caches, so the next layer reads its input from DRAM.
"""

import argparse
import pathlib
import sys

import torch

import rmask_kernels as rk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # benchmarks/: side_by_side
from side_by_side import median_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="neuron", choices=["neuron", "spatial"])
    parser.add_argument("--keep", type=float, default=0.1)
    args = parser.parse_args()
    n, c, h = 32, 64, 32
    weight, bias = torch.randn(c, c, 3, 3), torch.randn(c)
    mask = rk.random_mask((c, h, h), round(1 - args.keep, 3), args.mode, seed=0)
    index = rk.kept_index(mask, c)

    def layer(x):
        return rk.masked_conv2d(x, weight, bias, mask, 1, 1, backend="cpu", kept_index=index)

    x = torch.randn(n, c, h, h)
    copy, sweep = torch.empty_like(x), torch.empty(64 * 2**20 // 4)
    produced = {}

    def produce():  # the input as a model's next layer finds it: written by this op's kernels
        produced["x"] = layer(x)

    with torch.no_grad():
        rows = {
            "the same input as the call before (in cache)": median_ms(lambda: layer(x), 100),
            "written by plain stores just before (copy_)": median_ms(lambda: layer(copy), 100, lambda: copy.copy_(x)),
            "after a 64 MB sweep (evicted from L2)": median_ms(lambda: layer(x), 100, lambda: sweep.fill_(1.0)),
            "written by the op's streaming stores just before": median_ms(lambda: layer(produced["x"]), 100, produce),
        }
    print(f"kernels: {rk.backends.cpu_kernels()}, threads: {torch.get_num_threads()}, "
          f"{args.mode} keep {args.keep}, {n}x{c}->{c}@{h} s1")
    for state, ms in rows.items():
        print(f"  input {state}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
