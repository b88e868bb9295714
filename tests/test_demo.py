"""`make demo` (rmask_kernels.demo) end to end with --quick: the same path as the full demo on a
few hundred digits and one epoch. Checks what it prints and writes, not its numbers (tiny
training); the full demo prints the robustness checks itself."""

import re

import pytest

from rmask_kernels import demo

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _table(output):
    """The markdown table's rows (lists of cells), header first, separator dropped."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [row for row in rows if not all(re.fullmatch(r"-+:?", cell) for cell in row)]


def test_quick_demo(tmp_path, capsys, one_thread):
    out = tmp_path / "demo"
    # A run left by an earlier demo: train() refuses to overwrite a run, so the demo starts afresh.
    stale = out / "runs" / "normal" / "last.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run")
    assert demo.main(["--quick", "--out", str(out)]) == 0
    output = capsys.readouterr().out

    header, *rows = _table(output)
    attacks = [f"{family} {eps:g}" for family in ("FGSM", "PGD") for eps in demo.EPS]
    assert header == ["target", "clean accuracy", *attacks]
    assert [row[0] for row in rows] == [
        "normal", "random mask 0.5", "random mask 0.9", "random mask 0.9, bn_stats=kept"
    ]
    for row in rows:
        assert len(row) == len(header)
        for cell in row[1:]:  # percentages, or n/a when nothing was counted
            assert cell == "n/a" or 0.0 <= float(cell) <= 100.0, row

    for name in ("accuracy_vs_eps.png", "examples.png"):
        png = out / name
        assert png.is_file() and png.stat().st_size > 0, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text().startswith("| target |")
    assert (out / "results.csv").read_text().startswith("target,attack,")
    for run in ("source", "normal", "rm0.5", "rm0.9", "rm0.9-kept"):
        assert (out / "runs" / run / "last.pt").is_file(), run
    assert stale.read_bytes() != b"an earlier run"

    # Fused vs reference: training time for both BN-statistics variants, and inference.
    timing = r"fused\s+[\d.]+ s\s+reference\s+[\d.]+ s\s+[\d.]+x"
    assert re.search(r"speed of random mask 0\.9: fused kernels", output)
    assert re.search(r"bn_stats=all\s+" + timing, output)
    assert re.search(r"bn_stats=kept\s+" + timing, output)
    assert re.search(rf"inference, the {demo.QUICK.limit_test} test images.*\n\s+" + timing, output)
    # The checks are printed with a verdict (not asserted: tiny training).
    assert re.search(r"PGD eps 0\.2: random mask 0\.9 keeps .* points over normal .*expected >= 20\): (yes|no)", output)
    assert re.search(r"clean accuracy within 2 points: .*: (yes|no)", output)
    assert re.search(r"bn_stats=kept keeps the robustness of bn_stats=all .*: (yes|no)", output)

