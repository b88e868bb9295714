"""GPU timings of the masked conv: the triton and cuda backends vs cuDNN ``F.conv2d(...) * mask``.

    .venv/bin/python benchmarks/gpu_times.py                 # the target shapes, keeps, fp32 + bf16
    .venv/bin/python benchmarks/gpu_times.py --batches 32 --keeps 0.1 1.0 --dtypes float32
    make bench-gpu                                           # the full sweep, JSON + markdown table

The GPU method of docs/design.md: both sides in the same precision (fp32 with TF32 off on
both, or bf16 on both), CUDA events around each call, the median of several rounds, providers
interleaved within each round. Columns: milliseconds; "speedup" = baseline / ours (> 1: ours
faster); "/ k·dense" = ours / (keep × the dense F.conv2d time), the spatial-mask target's
measure (<= 1.3).
Writes a JSON (device, torch / triton / CUDA versions, date, every timing) and, next to it, the
markdown table (same name, .md), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # (Cin, Cout, H = W, stride), 3x3, padding 1: the paper's ResNet-18 shallow stages
    (64, 64, 32, 1),
    (128, 128, 16, 1),
    (64, 128, 32, 2),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--modes", nargs="+", default=["spatial", "neuron"], choices=["spatial", "neuron", "group"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per provider (median reported)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="the Triton kernels take the rule's configs (RMASK_TRITON_AUTOTUNE=0), not the "
                             "fastest measured per shape")
    parser.add_argument("--json", default="benchmarks/results/gpu_latest.json",
                        help="where to write the results (the markdown table goes next to it, .md)")
    return parser.parse_args(argv)


def time_ms(call) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def interleaved_medians(providers: dict, rounds: int) -> dict:
    """Median ms per provider; each round runs every provider once, in turn."""
    for call in providers.values():  # warm-up: compilation, autotuning, cuDNN's algorithm choice
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, call in providers.items():
            times[name].append(time_ms(call))
    return {name: statistics.median(values) for name, values in times.items()}


def make_providers(rk, backends, x, weight, bias, mask, index, stride, backward):
    def run(forward):
        if not backward:
            def call():
                with torch.no_grad():
                    forward()
            return call

        def call():
            y = forward()
            y.backward(grad)
        grad = torch.randn_like(forward().detach())
        return call

    providers = {
        "dense": run(lambda: F.conv2d(x, weight, bias, stride, 1)),
        "baseline": run(lambda: F.conv2d(x, weight, bias, stride, 1) * mask),
    }
    for backend in backends:
        providers[backend] = run(lambda backend=backend: rk.masked_conv2d(
            x, weight, bias, mask, stride, 1, backend=backend, kept_index=index))
    return providers


def markdown(results, backends) -> str:
    header = ["shape", "batch", "mode", "dtype", "keep", "pass", "baseline ms"]
    for backend in backends:
        header += [f"{backend} ms", f"{backend} speedup", f"{backend} / k·dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["shape"], str(r["batch"]), r["mode"], r["dtype"], f"{r['keep']:g}", r["pass"],
                 f"{r['ms']['baseline']:.3f}"]
        for backend in backends:
            ours = r["ms"][backend]
            cells += [f"{ours:.3f}", f"{r['ms']['baseline'] / ours:.2f}x",
                      f"{ours / (r['keep'] * r['ms']['dense']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_times.py needs a CUDA device (torch.cuda.is_available() is False); "
              "the CPU benchmarks are `make bench` and benchmarks/op_times.py", file=sys.stderr)
        return 2
    if args.no_autotune:
        os.environ["RMASK_TRITON_AUTOTUNE"] = "0"
    import rmask_kernels as rk

    backends = [b for b in ("triton", "cuda") if b in rk.available_backends()]
    if not backends:
        print(f"no GPU backend available (available: {rk.available_backends()}): build the extension "
              "with CUDA and/or install triton", file=sys.stderr)
        return 2
    # The same precision on both sides: strict fp32 (TF32 off for cuDNN and for the Triton
    # kernels, which follow cudnn.allow_tf32), or bf16 inputs on both.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    results = []
    for cin, cout, size, stride in SHAPES:
        out = (size - 1) // stride + 1
        for batch in args.batches:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                x = torch.randn(batch, cin, size, size, device=device, dtype=dtype)
                weight = torch.randn(cout, cin, 3, 3, device=device, dtype=dtype) * (2.0 / (cin * 9)) ** 0.5
                bias = torch.randn(cout, device=device, dtype=dtype)
                for mode in args.modes:
                    for keep in args.keeps:
                        ratio = round(1.0 - keep, 6)
                        group_size = 16 if mode == "group" else None
                        mask = rk.random_mask((cout, out, out), ratio, mode, group_size, seed=0, device=device)
                        index = rk.kept_index(mask, cout)
                        for backward in (False, True):
                            for t in (x, weight, bias):
                                t.requires_grad_(backward)
                            providers = make_providers(rk, backends, x, weight, bias, mask, index, stride, backward)
                            ms = interleaved_medians(providers, args.rounds)
                            row = dict(shape=f"{cin}->{cout}@{size} s{stride}", batch=batch, mode=mode,
                                       dtype=dtype_name, keep=keep, **{"pass": "fwd+bwd" if backward else "fwd"},
                                       ms=ms)
                            results.append(row)
                            print(markdown([row], backends).splitlines()[-1], flush=True)
    try:
        import triton

        from rmask_kernels.triton import configs

        triton_version, triton_configs = triton.__version__, configs.chosen()
    except ImportError:
        triton_version, triton_configs = None, {}
    record = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton_version,
        cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        rounds=args.rounds, tf32=False, results=results,
        # The Triton configs measured fastest per call (empty with --no-autotune: the rule's).
        triton_autotune=not args.no_autotune, triton_configs=triton_configs,
    )
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    title = f"{record['device']}, torch {record['torch']}, triton {record['triton']}, {record['date']}"
    table = markdown(results, backends)
    path.with_suffix(".md").write_text(f"{title}\n\n{table}\n")
    print(f"\n{title} -> {path} and {path.with_suffix('.md')}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
