"""The row kernels' forward and backward with their operands in no cache (not pytest): a
neuron-masked 3x3 conv as a model runs it, its input written long before (docs/design.md,
section 6, "Input sparsity").

    .venv/bin/python benchmarks/investigations/cold_row_kernels.py                # 2 threads
    .venv/bin/python benchmarks/investigations/cold_row_kernels.py --threads 1

Batch 32, 64->64@32x32, keep 0.1 on the output; "inmask": the input zero where a neuron input
mask (keep 0.1) drops it and the mask passed as input_mask; "dense": no input mask. Before
each timed call 64 MB are written, which evicts the operands from every cache. To compare two
builds, run this once per build, alternating (a build's own time moves between runs on a VM).
"""

import argparse
import statistics
import time

import torch

import rmask_kernels as rk


def cold_ms(call, evict, rounds):
    """Median milliseconds of `call` over `rounds` runs, each after `evict()` (untimed)."""
    call()
    times = []
    for _ in range(rounds):
        evict()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, c, h = 32, 64, 32
    mask = rk.random_mask((c, h, h), 0.9, "neuron", seed=0)
    index = rk.kept_index(mask, c)
    input_mask = rk.random_mask((c, h, h), 0.9, "neuron", seed=1)
    input_index = rk.kept_index(input_mask, c)
    weight = torch.randn(c, c, 3, 3, requires_grad=True)
    junk = torch.zeros(16 << 20)  # 64 MB
    for case in ("inmask", "dense"):
        x = torch.randn(n, c, h, h)
        extra = dict(input_mask=input_mask, input_index=input_index) if case == "inmask" else {}
        if case == "inmask":
            x = x * input_mask
        x.requires_grad_()

        def forward():
            return rk.masked_conv2d(x, weight, None, mask, 1, 1, backend="cpu", kept_index=index, **extra)

        def infer():
            with torch.no_grad():
                forward()

        y = forward()
        grad = torch.randn_like(y)
        fwd = cold_ms(infer, lambda: junk.add_(1.0), args.rounds)
        bwd = cold_ms(lambda: torch.autograd.grad(y, (x, weight), grad, retain_graph=True), lambda: junk.add_(1.0),
                      args.rounds)
        print(f"{case:7s} forward {fwd:6.3f} ms   backward {bwd:6.3f} ms   ({args.threads} threads, "
              f"{rk.backends.cpu_kernels()})")


if __name__ == "__main__":
    main()
