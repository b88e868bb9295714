"""Markdown ratio tables from a pytest-benchmark JSON file written by `make bench`.

    python benchmarks/report.py benchmarks/results/latest.json

Milliseconds are pytest-benchmark medians. Speedups are measured side by side: the provider
and its baseline alternating in one process (side_by_side.py), the ratio of their medians;
for a JSON without those, the ratio of the two sequential medians. The baseline is
"baseline" (F.conv2d * mask) for the op and "reference" for the whole model.
"""

import json
import sys
from collections import defaultdict


def speedups(rows, baseline):
    """{key: {provider: speedup}} for every provider measured against `baseline`."""
    out = defaultdict(dict)
    for key, providers in rows.items():
        for provider, (ms, side_by_side) in providers.items():
            if provider == baseline or baseline not in providers:
                continue
            out[key][provider] = side_by_side if side_by_side else providers[baseline][0] / ms
    return out


def main(path):
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    rows = defaultdict(dict)  # (shape, mode, ratio, pass) -> provider -> (median ms, side-by-side speedup)
    shapes = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["shape"], info["mode"], info["ratio"], info["pass_"])
        rows[key][info["provider"]] = (bench["stats"]["median"] * 1e3, info.get("side_by_side_speedup"))
        if info["shape"] not in shapes:
            shapes.append(info["shape"])
    # Input sparsity rows: mode "in->out" (bench_input_sparsity.py), reported apart.
    input_rows = {k: v for k, v in rows.items() if "baseline" in v and "->" in k[1]}
    op_rows = {k: v for k, v in rows.items() if "baseline" in v and "->" not in k[1]}
    model_rows = {k: v for k, v in rows.items() if "baseline" not in v}
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    print(f"Run {data.get('datetime', '?')}, torch {first.get('torch', '?')}, {first.get('threads', '?')} threads, "
          f"CPU {machine.get('cpu', {}).get('brand_raw', '?')} ({first.get('cpu_capability', '?')}), "
          f"rmask CPU kernels: {first.get('cpu_kernels', '?')}\n")

    op_speedups = speedups(op_rows, "baseline")
    op_shapes = [s for s in shapes if any(k[0] == s for k in op_rows)]
    if op_rows:
        method = "side by side" if any(p[1] for v in op_rows.values() for p in v.values()) else "sequential medians"
        print(f"Speedup of auto over F.conv2d * mask ({method}); shapes {' / '.join(op_shapes)}\n")
        print("| mode | ratio | fwd | fwd+bwd | bwd |")
        print("|---|---|---|---|---|")
        for mode, ratio in sorted({(k[1], k[2]) for k in op_rows}, key=lambda m: (m[0], -m[1])):
            cells = []
            for pass_ in ("fwd", "fwd+bwd", "bwd"):
                values = [op_speedups.get((s, mode, ratio, pass_), {}).get("auto") for s in op_shapes]
                cells.append(" / ".join(f"{v:.2f}" if v else "-" for v in values))
            print(f"| {mode} | {ratio} | {' | '.join(cells)} |")
        print("\n| shape | mode | ratio | pass | baseline ms | cpu ms | auto ms | cpu speedup | auto speedup |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, providers in sorted(op_rows.items()):
            cells = [f"{providers[p][0]:.1f}" if p in providers else "-" for p in ("cpu", "auto")]
            ratios = [f"{op_speedups[key][p]:.2f}x" if p in op_speedups[key] else "-" for p in ("cpu", "auto")]
            print(f"| {' | '.join(str(k) for k in key)} | {providers['baseline'][0]:.1f} | {' | '.join(cells)} | "
                  f"{' | '.join(ratios)} |")
    if input_rows:
        input_speedups = speedups(input_rows, "baseline")
        print("\nInput sparsity (input_mask, keep_in = keep_out = 0.1): cpu over F.conv2d * mask, side by side\n")
        print("| shape | masks (in->out) | pass | baseline ms | cpu ms | speedup |")
        print("|---|---|---|---|---|---|")
        for key, providers in sorted(input_rows.items()):
            speedup = input_speedups[key].get("cpu")
            cpu_ms = f"{providers['cpu'][0]:.2f}" if "cpu" in providers else "-"
            print(f"| {key[0]} | {key[1]} | {key[3]} | {providers['baseline'][0]:.2f} | {cpu_ms} | "
                  f"{f'{speedup:.2f}x' if speedup else '-'} |")
    if model_rows:
        model_speedups = speedups(model_rows, "reference")
        print("\n| model | mode | pass | provider | ms | speedup vs reference |")
        print("|---|---|---|---|---|---|")
        for key, providers in sorted(model_rows.items()):
            for provider, (ms, _) in sorted(providers.items()):
                speedup = model_speedups[key].get(provider)
                print(f"| {key[0]} | {key[1]} | {key[3]} | {provider} | {ms:.1f} | "
                      f"{f'{speedup:.2f}x' if speedup else '-'} |")


if __name__ == "__main__":
    main(sys.argv[1])
