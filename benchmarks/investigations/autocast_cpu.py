"""Under CPU autocast (bfloat16 by default), three ways to run a masked conv, alternated round
by round in one process (not pytest): what "auto" should take for a low-precision input on
the CPU (docs/design.md, "How auto chooses").

    .venv/bin/python benchmarks/investigations/autocast_cpu.py
    .venv/bin/python benchmarks/investigations/autocast_cpu.py --dtype float16 --backward

- dense:    F.conv2d * mask in the autocast dtype (oneDNN), what "reference" runs
- portable: the CPU op on the autocast dtype's tensors (the portable kernels, fp32 accumulation)
- fp32:     the CPU op on float32 tensors (the batch-vector kernels), output cast to the autocast dtype
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import rmask_kernels as rk


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu kernels {rk.backends.cpu_kernels()}, "
          f"{args.dtype}, batch {args.batch}, {'fwd+bwd' if args.backward else 'fwd'}; median ms")
    print(f"{'shape':>22} {'mode':>8} {'keep':>5} {'dense':>8} {'portable':>9} {'fp32':>8}")
    for cin, cout, size, stride in [(64, 64, 32, 1), (128, 128, 16, 1), (64, 128, 32, 2)]:
        out = (size - 1) // stride + 1
        for mode, keep in [("neuron", 0.1), ("neuron", 0.5), ("spatial", 0.1), ("spatial", 0.5)]:
            mask = rk.random_mask((cout, out, out), round(1 - keep, 3), mode, seed=0)
            index = rk.kept_index(mask, cout)
            x = torch.randn(args.batch, cin, size, size, requires_grad=args.backward)
            weight = torch.randn(cout, cin, 3, 3, requires_grad=args.backward)
            low_x, low_w = x.detach().to(dtype).requires_grad_(args.backward), weight.detach().to(dtype)

            def dense():
                with torch.autocast("cpu", dtype=dtype):
                    return F.conv2d(x, weight, None, stride, 1) * mask

            def portable():
                return rk.masked_conv2d(low_x, low_w, None, mask, stride, 1, backend="cpu", kept_index=index)

            def fp32():
                return rk.masked_conv2d(x, weight, None, mask, stride, 1, backend="cpu", kept_index=index).to(dtype)

            calls = [dense, portable, fp32]
            times = [[] for _ in calls]
            for round_ in range(args.rounds + 1):
                for call, record in zip(calls, times):
                    start = time.perf_counter()
                    y = call()
                    if args.backward:
                        y.backward(torch.ones_like(y))
                    if round_:
                        record.append((time.perf_counter() - start) * 1e3)
            medians = [statistics.median(t) for t in times]
            shape = f"{cin}->{cout}@{size}" + (" s2" if stride == 2 else "")
            print(f"{shape:>22} {mode:>8} {keep:>5} " + " ".join(f"{m:8.2f}" for m in medians))


if __name__ == "__main__":
    main()
