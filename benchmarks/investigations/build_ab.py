"""Times that compare two builds of the CPU kernels (not pytest): run once per build,
alternating, each build on PYTHONPATH (a build's own time moves between runs on a VM).

    .venv/bin/python benchmarks/investigations/build_ab.py
    PYTHONPATH=/tmp/other-build .venv/bin/python benchmarks/investigations/build_ab.py

Batch 32, keep 0.1 on both sides, 2 threads by default. "cold" runs each call after a 64 MB
copy has swept the caches (a model's layer finds its operands there); "warm" repeats the call.
- spatial->spatial op, 64->64@32 and 128->128@16: forward, and forward + backward (of a sum);
- neuron->neuron op with bias, ReLU and a residual, 64->64@32 (a ResNet block's second conv);
- the paper's ResNet-18 masked stages (benchmarks/bench_input_sparsity.py): inference and the
  train step with bn_stats="kept", medians of whole passes.
The numbers and what they compared: docs/design.md, section 6, "Input sparsity".
"""

import argparse
import pathlib
import statistics
import sys
import time

import torch

import rmask_kernels as rk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # benchmarks/
from bench_input_sparsity import masked_stages, stages_pass  # noqa: E402


def median_ms(call, rounds, sweep=None):
    """Median milliseconds of `call` over `rounds` runs, each after `sweep()` (untimed) if given."""
    call()
    times = []
    for _ in range(rounds):
        if sweep:
            sweep()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def op(mode, c, h, grad, epilogue=False):
    """A masked conv whose input is zero where a `mode` input mask drops it, and its call; with
    `epilogue`, a bias, the ReLU and a residual."""
    input_mask = rk.random_mask((c, h, h), 0.9, mode, seed=1)
    input_index = rk.kept_index(input_mask, c)
    mask = rk.random_mask((c, h, h), 0.9, mode, seed=0)
    index = rk.kept_index(mask, c)
    x = (torch.randn(32, c, h, h) * input_mask).requires_grad_(grad)
    weight = torch.randn(c, c, 3, 3, requires_grad=grad)
    bias, residual = (torch.randn(c), torch.randn(32, c, h, h)) if epilogue else (None, None)

    def forward():
        return rk.masked_conv2d(x, weight, bias, mask, 1, 1, backend="cpu", kept_index=index, input_mask=input_mask,
                                input_index=input_index, relu=epilogue, residual=residual)

    if grad:
        return lambda: forward().sum().backward()

    def infer():
        with torch.no_grad():
            forward()
    return infer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = torch.randn(16 << 20)  # 64 MB
    target = torch.empty_like(source)
    sweep = lambda: target.copy_(source)  # noqa: E731
    print(f"{rk.__file__}: {args.threads} threads, {rk.backends.cpu_kernels()}")
    cases = [
        ("spatial->spatial 64@32 forward", op("spatial", 64, 32, False)),
        ("spatial->spatial 128@16 forward", op("spatial", 128, 16, False)),
        ("spatial->spatial 64@32 fwd+bwd", op("spatial", 64, 32, True)),
        ("neuron->neuron 64@32 forward, bias+relu+residual", op("neuron", 64, 32, False, epilogue=True)),
    ]
    for name, call in cases:
        print(f"{name:50s} warm {median_ms(call, args.rounds):7.3f} ms   "
              f"cold {median_ms(call, args.rounds, sweep):7.3f} ms", flush=True)
    x = torch.randn(32, 3, 32, 32)
    for mode in ("neuron", "spatial"):
        for pass_ in ("inference", "train step"):
            run = stages_pass(masked_stages("cpu", mode), pass_, x)
            print(f"masked stages {mode:7s} {pass_:10s} {median_ms(run, max(args.rounds // 3, 5)):8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
