"""Quick timings of the forced CPU op, for comparing builds and kernel sets (not pytest).

    .venv/bin/python benchmarks/op_times.py            # forward ms at keep 0.001 / 0.1 / 0.5 / 1.0
    .venv/bin/python benchmarks/op_times.py --speedup  # side-by-side speedups vs F.conv2d * mask
    .venv/bin/python benchmarks/op_times.py --batch 2  # the same shapes at another batch size
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/op_times.py --speedup

The first form gives the "fixed part" (keep 0.001: laying the input out, writing the output)
and the arithmetic's cost as the keep grows: the numbers to compare two builds by. The second
measures the crossover that rmask_kernels/backends.py encodes (docs/design.md, section 4); the
environment variables hold both sides to AVX2 on an AVX-512 CPU.
"""

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

import rmask_kernels as rk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from side_by_side import median_ms, side_by_side  # noqa: E402

SHAPES = [(32, 64, 64, 32, 1), (32, 128, 128, 16, 1), (32, 64, 128, 32, 2)]  # N, Cin, Cout, H, stride


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", action="store_true", help="side-by-side speedups, fwd and fwd+bwd")
    parser.add_argument("--mode", default="neuron", choices=["neuron", "spatial"])
    parser.add_argument("--batch", type=int, default=32, help="images per call (default 32, the targets' batch)")
    parser.add_argument("--keeps", type=float, nargs="+", help="keep fractions (default: 0.5 0.7 1.0 with --speedup, else 0.001 0.1 0.5 1.0)")
    args = parser.parse_args()
    print(f"kernels: {rk.backends.cpu_kernels()}, threads: {torch.get_num_threads()}, mode: {args.mode}")
    keeps = args.keeps or ([0.5, 0.7, 1.0] if args.speedup else [0.001, 0.1, 0.5, 1.0])
    for _, cin, cout, h, stride in SHAPES:
        n = args.batch
        out = (h - 1) // stride + 1
        x = torch.randn(n, cin, h, h, requires_grad=args.speedup)
        w = torch.randn(cout, cin, 3, 3, requires_grad=args.speedup)
        b = torch.randn(cout, requires_grad=args.speedup)
        cells = []
        for keep in keeps:
            mask = rk.random_mask((cout, out, out), round(1 - keep, 3), args.mode, seed=0)
            index = rk.kept_index(mask, cout)

            def ours():
                return rk.masked_conv2d(x, w, b, mask, stride, 1, backend="cpu", kept_index=index)

            def dense():
                return F.conv2d(x, w, b, stride, 1) * mask

            if not args.speedup:
                with torch.no_grad():
                    cells.append(f"keep {keep}: {median_ms(ours):.2f} ms")
                continue
            with torch.no_grad():
                fwd = side_by_side((None, dense), (None, ours), 9)["side_by_side_speedup"]
            both = side_by_side((None, lambda: dense().sum().backward()), (None, lambda: ours().sum().backward()), 7)
            cells.append(f"keep {keep}: fwd {fwd:.2f}x fwd+bwd {both['side_by_side_speedup']:.2f}x")
        print(f"{n}x{cin}->{cout}@{h} s{stride}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
