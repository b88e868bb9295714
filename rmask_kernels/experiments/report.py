"""What `rmask reproduce` writes once every step is done: ``results.csv`` (every evaluation
row), ``report.md`` (the paper's tables and the claims checked on this run's numbers) and the
plots, all from the evaluation steps' rows.

The claims and the rule each is checked by (`claims`; "reference" = the shallow target with
neuron masks, no control and the highest ratio, the paper's robust network):

(a) shallow masking protects against transfer attacks, deep masking does not: the reference's
    mean black-box defense success rate is at least `PROTECTION_MARGIN` above the normal
    network's, and every deep target's is less than that above it;
(b) a higher shallow ratio protects more: over the shallow neuron targets sorted by ratio the
    rate never falls by more than `ORDER_SLACK` and ends higher than it starts;
(c) clean accuracy stays close to the normal network's: every masked target without a control
    is within `CLEAN_TOLERANCE` of it;
(d) patch shuffling hurts the masked network more: the reference loses more accuracy to
    shuffling than the normal network, averaged over the grid sizes;
(e) decision-based attacks need a larger distortion against the masked network: the reference's
    mean squared distortion is larger than the normal network's.
A claim whose runs or evaluations the plan lacks is "not measured".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .checkpoint import atomic_write
from .evaluate import to_markdown, write_csv
from .plans import Plan

__all__ = ["COLUMNS", "claims", "write_report"]

COLUMNS = ("target", "setting", "source", "attack", "family", "eps", "s", "clean_accuracy", "defense_success_rate",
           "transfer_rate", "counted", "defended", "fooled_source", "clean_correct", "examples", "accuracy",
           "mean_squared_distortion", "attacked", "succeeded", "model", "placement", "mask_ratio", "mask_mode",
           "control")
RESULTS_CSV, REPORT, RATIO_PLOT, EPS_PLOT = "results.csv", "report.md", "defense_vs_ratio.png", "accuracy_vs_eps.png"
PROTECTION_MARGIN = 0.10  # (a): 10 points of defense success rate
ORDER_SLACK = 0.02  # (b): noise allowed between neighbouring ratios
CLEAN_TOLERANCE = 0.05  # (c): 5 points of clean accuracy

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"


def _mean(values) -> float:
    values = [value for value in values if isinstance(value, (int, float)) and not math.isnan(value)]
    return sum(values) / len(values) if values else math.nan


def _pivot(rows: Sequence[Dict[str, Any]], row_key: Callable, column_key: Callable, value: str,
           first: str = "target", total: Optional[str] = "mean") -> List[Dict[str, Any]]:
    """Rows ``row_key(row)`` × columns ``column_key(row)``, the mean of ``value`` per cell, plus
    the mean of the row's cells."""
    cells: Dict[Any, Dict[Any, List[float]]] = {}
    for row in rows:
        cells.setdefault(row_key(row), {}).setdefault(column_key(row), []).append(row.get(value))
    table = []
    for key, columns in cells.items():
        entry: Dict[str, Any] = dict(key) if isinstance(key, tuple) else {first: key}
        entry.update({str(column): _mean(values) for column, values in columns.items()})
        if total:
            entry[total] = _mean(_mean(values) for values in columns.values())
        table.append(entry)
    return table


def _select(rows, setting: str) -> List[Dict[str, Any]]:
    return [row for row in rows if row["setting"] == setting]


# ---------------------------------------------------------------------------------------------
# Claims


def _black_box(rows, target: str) -> float:
    return _mean(row.get("defense_success_rate") for row in rows
                 if row["setting"] == "black-box" and row["target"] == target)


def _clean(rows) -> Dict[str, float]:
    return {row["target"]: row["clean_accuracy"] for row in rows if row["setting"] == "clean"}


def _roles(rows) -> Tuple[Optional[str], Optional[str], List[Tuple[float, str]], List[Tuple[float, str]]]:
    """(normal, reference, shallow neuron targets by ratio, deep neuron targets by ratio)."""
    targets = {row["target"]: row for row in rows if row["setting"] == "clean"}
    normal = next((name for name, row in targets.items() if not row["mask_ratio"] and not row["control"]), None)

    def placed(placement):
        return sorted((row["mask_ratio"], name) for name, row in targets.items()
                      if row["mask_ratio"] and not row["control"] and row["placement"] == placement
                      and row["mask_mode"] == "neuron")

    shallow, deep = placed("shallow"), placed("deep")
    return normal, (shallow[-1][1] if shallow else None), shallow, deep


def _shown(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _claim(letter: str, text: str, verdict: str, numbers: str) -> Dict[str, str]:
    return {"claim": f"({letter}) {text}", "verdict": verdict, "numbers": numbers}


def claims(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, str]]:
    """The paper's five claims checked on ``rows`` (see the module docstring)."""
    normal, reference, shallow, deep = _roles(rows)
    clean = _clean(rows)
    found = []

    text = "masking shallow layers protects against transfer attacks; masking deep ones does not"
    rates = {name: _black_box(rows, name) for name in [normal, *(n for _, n in shallow + deep)] if name}
    if normal is None or reference is None or not deep or math.isnan(rates[normal]) or math.isnan(rates[reference]):
        found.append(_claim("a", text, UNMEASURED, "needs black-box rows of normal, a shallow and a deep target"))
    else:
        deep_gains = [rates[name] - rates[normal] for _, name in deep if not math.isnan(rates[name])]
        ok = rates[reference] - rates[normal] >= PROTECTION_MARGIN and all(g < PROTECTION_MARGIN for g in deep_gains)
        numbers = ", ".join(f"{name} {_shown(rate)}" for name, rate in rates.items())
        found.append(_claim("a", text, HOLDS if ok else FAILS,
                            f"mean black-box defense success rate: {numbers} (margin {PROTECTION_MARGIN:g})"))

    text = "a higher shallow mask ratio protects more"
    series = [(ratio, name, _black_box(rows, name)) for ratio, name in shallow]
    series = [item for item in series if not math.isnan(item[2])]
    if len(series) < 2:
        found.append(_claim("b", text, UNMEASURED, "needs black-box rows of two shallow ratios or more"))
    else:
        values = [rate for _, _, rate in series]
        ok = all(b - a >= -ORDER_SLACK for a, b in zip(values, values[1:])) and values[-1] > values[0]
        numbers = ", ".join(f"{ratio:g}: {_shown(rate)}" for ratio, _, rate in series)
        found.append(_claim("b", text, HOLDS if ok else FAILS,
                            f"mean black-box defense success rate by shallow ratio: {numbers} (slack {ORDER_SLACK:g})"))

    text = "clean accuracy stays close to the normal network's"
    masked = [name for name in clean if name != normal and any(name == n for _, n in shallow + deep)]
    masked += [row["target"] for row in rows if row["setting"] == "clean" and row["mask_mode"] == "spatial"
               and not row["control"] and row["target"] not in masked]
    if normal is None or not masked:
        found.append(_claim("c", text, UNMEASURED, "needs the normal network and a masked one"))
    else:
        ok = all(clean[normal] - clean[name] <= CLEAN_TOLERANCE for name in masked)
        numbers = ", ".join(f"{name} {clean[name]:.3f}" for name in [normal, *masked])
        found.append(_claim("c", text, HOLDS if ok else FAILS,
                            f"clean accuracy: {numbers} (tolerance {CLEAN_TOLERANCE:g})"))

    text = "patch shuffling hurts the masked network more"
    drops = {}
    for name in (normal, reference):
        shuffled = [row for row in rows if row["setting"] == "patch-shuffle" and row["target"] == name]
        if name is not None and shuffled:
            drops[name] = (_mean(clean[name] - row["accuracy"] for row in shuffled),
                           ", ".join(f"s={row['s']} {row['accuracy']:.3f}" for row in shuffled))
    if normal not in drops or reference not in drops:
        found.append(_claim("d", text, UNMEASURED, "needs patch-shuffle rows of normal and a shallow target"))
    else:
        ok = drops[reference][0] > drops[normal][0]
        numbers = "; ".join(f"{name}: clean {clean[name]:.3f}, {detail}, mean drop {drop:.3f}"
                            for name, (drop, detail) in drops.items())
        found.append(_claim("d", text, HOLDS if ok else FAILS, numbers))

    text = "decision-based attacks need a larger distortion against the masked network"
    distortion = {row["target"]: row for row in rows if row["setting"] == "decision"}
    if normal not in distortion or reference not in distortion or any(
            math.isnan(distortion[name]["mean_squared_distortion"]) for name in (normal, reference)):
        found.append(_claim("e", text, UNMEASURED, "needs decision-based rows of normal and a shallow target"))
    else:
        ok = distortion[reference]["mean_squared_distortion"] > distortion[normal]["mean_squared_distortion"]
        numbers = ", ".join(f"{name} {distortion[name]['mean_squared_distortion']:.3g} "
                            f"({distortion[name]['succeeded']}/{distortion[name]['attacked']} succeeded)"
                            for name in (normal, reference))
        found.append(_claim("e", text, HOLDS if ok else FAILS, f"mean squared distortion: {numbers}"))
    return found



# ---------------------------------------------------------------------------------------------
# The report


def _plots(rows: Sequence[Dict[str, Any]], out: Path) -> List[str]:
    """The plots that can be drawn; notes for those that cannot."""
    from .plots import plot_accuracy_vs_eps, plot_lines

    normal, reference, shallow, deep = _roles(rows)
    lines = []
    try:
        curves = {}
        for placement, targets in (("shallow", shallow), ("deep", deep)):
            points = {ratio: _black_box(rows, name) for ratio, name in targets}
            if normal is not None and points:
                points[0.0] = _black_box(rows, normal)
            if points:
                curves[placement] = points
        if curves and any(not math.isnan(y) for points in curves.values() for y in points.values()):
            plot_lines(curves, out / RATIO_PLOT, "mask ratio", "mean black-box defense success rate",
                       "Defense success rate vs mask ratio")
            lines.append(f"![defense success rate vs mask ratio]({RATIO_PLOT})")
        shown = {normal, reference, *(name for _, name in deep[-1:])}
        eps_rows = [row for row in rows if row["setting"] == "black-box" and row["target"] in shown
                    and row.get("eps") is not None and not math.isnan(row["defense_success_rate"])]
        if eps_rows:
            plot_accuracy_vs_eps(eps_rows, out / EPS_PLOT, title="Black-box: lowest defense rate over sources")
            lines.append(f"![accuracy vs eps]({EPS_PLOT})")
    except ImportError as error:
        lines.append(f"No plots: {error}")
    return lines


def _section(title: str, rows: Sequence[Dict[str, Any]], note: str = "", digits: int = 3) -> str:
    if not rows:
        return ""
    return f"## {title}\n\n" + (f"{note}\n\n" if note else "") + to_markdown(rows, digits=digits) + "\n"


def write_report(plan: Plan, rows: Sequence[Dict[str, Any]], step_count: int, out: Path) -> Path:
    """results.csv, report.md and the plots in ``out`` from the evaluation ``rows`` of a study of
    ``step_count`` steps; returns report.md's path."""
    write_csv(out / RESULTS_CSV, rows, COLUMNS)
    target = lambda row: row["target"]  # noqa: E731
    clean_rows = [{key: row[key] for key in ("target", "model", "placement", "mask_ratio", "mask_mode", "control",
                                              "clean_accuracy")} for row in _select(rows, "clean")]
    black = _select(rows, "black-box")
    parts = [
        f"# Study `{plan.name}` on {plan.data}\n\n{plan.description}\n\n"
        f"{step_count} steps; every number below is from this run's `{RESULTS_CSV}`. Defense success rate: "
        "among the adversarial examples that fooled the source and whose clean image the target classifies "
        "correctly, the fraction the target still classifies correctly.\n\n",
        _section("Clean accuracy", clean_rows),
        _section("Black-box transfer: defense success rate by target (mean over sources)",
                 _pivot(black, target, lambda row: row["attack"], "defense_success_rate")),
        _section("Black-box transfer: defense success rate by source (mean over attacks)",
                 _pivot(black, target, lambda row: row["source"], "defense_success_rate")),
        _section("Gray-box: defense success rate (source: another Random-Mask network, same ratio)",
                 _pivot(_select(rows, "gray-box"), lambda row: (("target", row["target"]), ("source", row["source"])),
                        lambda row: row["attack"], "defense_success_rate")),
        _section("White-box: accuracy on the target's own adversarial examples",
                 _pivot(_select(rows, "white-box"), target, lambda row: row["attack"], "defense_success_rate")),
        _section("Random noise: accuracy (Gaussian, sigma eps/2 truncated to ±eps; eps in /255)",
                 _pivot(_select(rows, "noise"), target, lambda row: f"eps {row['eps']:g}", "accuracy", total=None)),
        _section("Patch shuffling: accuracy (s×s grid of patches, randomly permuted)",
                 _pivot(_select(rows, "patch-shuffle"), target, lambda row: f"s={row['s']}", "accuracy", total=None)),
        _section("Decision-based attack: mean squared distortion (larger = more robust)",
                 [{key: row[key] for key in ("target", "attack", "attacked", "succeeded", "mean_squared_distortion")}
                  for row in _select(rows, "decision")], digits=6),
        "## Claims\n\nEach claim of the paper checked on this run's numbers (rules: "
        "`rmask_kernels/experiments/report.py`).\n\n" + to_markdown(claims(rows), ("claim", "verdict", "numbers")),
    ]
    plots = _plots(rows, out)
    if plots:
        parts.append("\n## Plots\n\n" + "\n\n".join(plots) + "\n")
    text = "".join(parts)
    return atomic_write(out / REPORT, lambda handle: handle.write(text.encode()))
