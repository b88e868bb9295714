"""The benchmark files still run (each selected case once, timing disabled): `make bench`
must not rot between the runs that refresh benchmarks/results/."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmark_files_run():
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
        "--benchmark-disable", str(ROOT / "benchmarks" / "bench_masked_conv2d.py"),
        "-k", "16x16 and neuron and 0.9",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "12 passed" in result.stdout, result.stdout[-2000:]


def test_input_sparsity_benchmarks_run():
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
        "--benchmark-disable", str(ROOT / "benchmarks" / "bench_input_sparsity.py"), "-k", "16x16 or inference",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "12 passed" in result.stdout, result.stdout[-2000:]


def test_report_renders_a_ratio_table(tmp_path):
    import json

    # cpu has a side-by-side speedup (quoted), auto none (the sequential ratio stands in).
    runs = [("baseline", 0.020, None), ("cpu", 0.008, 3.0), ("auto", 0.010, None)]
    data = {
        "datetime": "2000-01-01T00:00:00",
        "machine_info": {"cpu": {"brand_raw": "test cpu"}},
        "benchmarks": [
            {
                "extra_info": {"shape": "s", "mode": "neuron", "ratio": 0.9, "pass_": "fwd", "provider": provider,
                               "torch": "x", "threads": 2, "cpu_capability": "AVX2",
                               **({"side_by_side_speedup": side} if side else {})},
                "stats": {"median": median},
            }
            for provider, median, side in runs
        ] + [
            {
                "extra_info": {"shape": "s", "mode": "spatial->spatial", "ratio": 0.9, "pass_": "fwd",
                               "provider": provider, **({"side_by_side_speedup": side} if side else {})},
                "stats": {"median": median},
            }
            for provider, median, side in (("baseline", 0.010, None), ("cpu", 0.001, 12.5))
        ],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| s | neuron | 0.9 | fwd | 20.0 | 8.0 | 10.0 | 3.00x | 2.00x |" in out
    assert "| neuron | 0.9 | 2.00 | - | - |" in out
    assert "| s | spatial->spatial | fwd | 10.00 | 1.00 | 12.50x |" in out
    assert "spatial->spatial | 0.9 |" not in out  # input sparsity rows stay out of the op tables
