"""Markdown ratio tables from a pytest-benchmark JSON file written by `make bench`.

    python benchmarks/report.py benchmarks/results/latest.json

Speedup = baseline median / provider median, both measured in the same run. The baseline is
"baseline" (F.conv2d * mask) for the op and "reference" for the whole model.
"""

import json
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["shape"], info["mode"], info["ratio"], info["pass_"])
        rows[key][info["provider"]] = bench["stats"]["median"] * 1e3
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    print(f"Run {data.get('datetime', '?')}, torch {first.get('torch', '?')}, {first.get('threads', '?')} threads, "
          f"CPU {machine.get('cpu', {}).get('brand_raw', '?')} ({first.get('cpu_capability', '?')})\n")
    print("| shape | mode | ratio | pass | baseline ms | cpu ms | auto ms | cpu speedup | auto speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    model_rows = []
    for (shape, mode, ratio, pass_), times in sorted(rows.items()):
        if "baseline" not in times:
            model_rows.append((shape, pass_, times))
            continue
        base = times["baseline"]
        cells = [f"{times[p]:.1f}" if p in times else "-" for p in ("cpu", "auto")]
        ratios = [f"{base / times[p]:.2f}x" if p in times else "-" for p in ("cpu", "auto")]
        print(f"| {shape} | {mode} | {ratio} | {pass_} | {base:.1f} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} |")
    if model_rows:
        print("\n| model | pass | provider | ms | speedup vs reference |")
        print("|---|---|---|---|---|")
        for shape, pass_, times in model_rows:
            base = times.get("reference")
            for provider, ms in sorted(times.items()):
                speedup = f"{base / ms:.2f}x" if base else "-"
                print(f"| {shape} | {pass_} | {provider} | {ms:.1f} | {speedup} |")


if __name__ == "__main__":
    main(sys.argv[1])
