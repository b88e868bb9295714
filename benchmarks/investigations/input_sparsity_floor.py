"""The floor of a masked conv whose input is masked too (input_mask), on this CPU: what the
targets of input-sparse kernels are measured against, before any such kernel exists.

    .venv/bin/python benchmarks/investigations/input_sparsity_floor.py [--threads 2]

For the op-level shapes (batch 32, 3x3, padding 1) it prints, side by side in one process:
- what a user writes today, F.conv2d(x, w, padding=1) * mask (forward, and forward+backward),
- the fused op with the output mask only (the kernels skip masked outputs, read every input),
- the ceilings: fp32 matmul rate (a 2048^2 a @ b) and copy rate (a 64 MiB copy_),
- the floors at keep_in = keep_out = 0.1: the arithmetic (keep_in x keep_out of the dense
  FLOPs) at the matmul rate, and the compulsory bytes (x read, y written: dense tensors in and
  out, or kept values only) at the copy rate; with the speedup over F.conv2d * mask each allows.
"""

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

import rmask_kernels as rk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from side_by_side import median_ms, side_by_side  # noqa: E402

SHAPES = [(32, 64, 64, 32), (32, 128, 128, 16)]  # N, Cin = Cout, H = W
KEEP = 0.1


def ceilings():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul_ms = median_ms(lambda: a @ b, 9)
    source, target = torch.randn(16 << 20), torch.empty(16 << 20)
    copy_ms = median_ms(lambda: target.copy_(source), 21)
    return 2 * 2048 ** 3 / matmul_ms / 1e6, 2 * source.numel() * 4 / copy_ms / 1e6  # GFLOP/s, GB/s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gflops, gbps = ceilings()
    print(f"kernels: {rk.backends.cpu_kernels()}, threads: {torch.get_num_threads()}; "
          f"matmul {gflops:.0f} GFLOP/s, copy {gbps:.1f} GB/s (read + write)")
    for n, c, _, h in SHAPES:
        x = torch.randn(n, c, h, h, requires_grad=True)
        w = torch.randn(c, c, 3, 3, requires_grad=True)
        dense_flops = 2 * n * c * h * h * c * 9
        print(f"\n{c}->{c}@{h}x{h}, batch {n}: dense {dense_flops / 1e9:.2f} GFLOP")
        for mode in ("spatial", "neuron"):
            mask = rk.random_mask((c, h, h), round(1 - KEEP, 3), mode, seed=0)
            index = rk.kept_index(mask, c)
            input_mask = rk.random_mask((c, h, h), round(1 - KEEP, 3), mode, seed=1)
            xm = (x.detach() * input_mask).requires_grad_()

            def dense():
                return F.conv2d(xm, w, padding=1) * mask

            def fused():
                return rk.masked_conv2d(xm, w, None, mask, padding=1, backend="cpu", kept_index=index)

            with torch.no_grad():
                forward = side_by_side((None, dense), (None, fused), 15)
            both = side_by_side((None, lambda: dense().sum().backward()), (None, lambda: fused().sum().backward()), 9)
            dense_ms, fused_ms = forward["side_by_side_baseline_ms"], forward["side_by_side_ms"]
            arithmetic_ms = KEEP * KEEP * dense_flops / gflops / 1e6
            tensor_bytes = 4 * n * c * h * h
            dense_io_ms = 2 * tensor_bytes / gbps / 1e6  # x read and y written, whole tensors
            kept_io_ms = 2 * KEEP * tensor_bytes / gbps / 1e6  # kept values only, in and out
            print(f"  {mode:8s} F.conv2d * mask: fwd {dense_ms:7.2f} ms, fwd+bwd {both['side_by_side_baseline_ms']:7.2f} ms; "
                  f"fused, output mask only: fwd {fused_ms:6.2f} ms ({forward['side_by_side_speedup']:.1f}x), "
                  f"fwd+bwd {both['side_by_side_ms']:6.2f} ms ({both['side_by_side_speedup']:.1f}x)")
            print(f"           floor at keep {KEEP} x {KEEP}: arithmetic {arithmetic_ms:.3f} ms, dense x/y "
                  f"{dense_io_ms:.3f} ms, kept x/y {kept_io_ms:.3f} ms -> at most "
                  f"{dense_ms / (arithmetic_ms + dense_io_ms):.0f}x with dense tensors, "
                  f"{dense_ms / (arithmetic_ms + kept_io_ms):.0f}x with kept values only (forward)")


if __name__ == "__main__":
    main()
