"""BN over kept outputs (bn_stats="kept") on the CPU kernels against its torch formula, side
by side in one process (not pytest).

    .venv/bin/python benchmarks/investigations/kept_batch_norm.py

rmask_kernels.kept_batch_norm runs csrc/cpu/kept_batch_norm.cpp for float32 NCHW CPU tensors
and the torch formula elsewhere; here both run on the same tensors, alternating call by call:
the normalization alone (forward, with its ReLU) and forward + backward, on a masked conv's
output of 32x64x32x32 (neuron mask, ratio 0.9); then the train step of the masked stages of
the paper's ResNet-18 (benchmarks/bench_input_sparsity.py) with each. Numbers: docs/design.md,
section 6, "Input sparsity".
"""

import pathlib
import sys
import time

import torch

import rmask_kernels as rk
import rmask_kernels.kept_batch_norm as kbn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # benchmarks/
from bench_input_sparsity import masked_stages, stages_pass  # noqa: E402

ROUNDS = 25
KERNELS = kbn.use_cpu_kernels


def side_by_side(run, rounds=ROUNDS):
    """Median ms of run() with the kernels and with the formula, alternating call by call."""
    times = {True: [], False: []}
    for _ in range(rounds):
        for kernels in (True, False):
            kbn.use_cpu_kernels = KERNELS if kernels else (lambda *args: False)
            start = time.perf_counter()
            run()
            times[kernels].append(time.perf_counter() - start)
    kbn.use_cpu_kernels = KERNELS
    return {k: sorted(v[2:])[len(v[2:]) // 2] * 1e3 for k, v in times.items()}


def report(name, medians):
    kernels, formula = medians[True], medians[False]
    print(f"{name:36s} kernels {kernels:7.2f} ms  formula {formula:7.2f} ms  {formula / kernels:5.2f}x")


def main():
    torch.manual_seed(0)
    n, c, h = 32, 64, 32
    mask = rk.random_mask((c, h, h), 0.9, "neuron", seed=0)
    y = (torch.randn(n, c, h, h) * mask).requires_grad_()
    count = (mask.sum((1, 2)) * n).float().clamp(min=1)
    mean = y.detach().sum((0, 2, 3)) / count
    rstd = torch.rsqrt((y.detach().square().sum((0, 2, 3)) / count - mean.square()).clamp(min=0) + 1e-5)
    weight, bias = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    grad_out = torch.randn(n, c, h, h)
    assert KERNELS(y, mask, count, mean, rstd, weight, bias), "the CPU kernels do not serve these tensors"

    def forward():
        with torch.no_grad():
            kbn.kept_batch_norm(y, mask, count, mean, rstd, weight, bias, True)

    def forward_backward():
        out = kbn.kept_batch_norm(y, mask, count, mean, rstd, weight, bias, True)
        torch.autograd.grad(out, [y, weight, bias], grad_out)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report("BN+ReLU 32x64x32x32 forward", side_by_side(forward))
    report("BN+ReLU 32x64x32x32 forward+backward", side_by_side(forward_backward))
    x = torch.randn(32, 3, 32, 32)
    for mode in ("neuron", "spatial"):
        report(f"masked stages train step, {mode}", side_by_side(stages_pass(masked_stages("cpu", mode), "train step", x), 10))


if __name__ == "__main__":
    main()
