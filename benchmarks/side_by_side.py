"""Side-by-side timing for the benchmark files: the speedups in the report come from here.

pytest-benchmark times each provider in its own test, one after the other; on a shared VM
the machine's speed drifts between those tests (the same dense conv measured 6.4 and 10.3
ms minutes apart), so ratios of sequential medians carry that drift. Alternating the two
calls round by round exposes both to the same conditions (docs/design.md, "How to measure").
"""

import statistics
import time


def side_by_side(baseline, candidate, rounds):
    """Median milliseconds of `baseline` and `candidate` run alternately `rounds` times (after
    one untimed warm-up each). Each is a (setup, target) pair as benchmark.pedantic takes:
    setup (or None) returns the (args, kwargs) of one target call and is not timed."""
    times = ([], [])
    for round_ in range(rounds + 1):
        for which, (setup, target) in enumerate((baseline, candidate)):
            args, kwargs = setup() if setup else ((), {})
            start = time.perf_counter()
            target(*args, **kwargs)
            elapsed = time.perf_counter() - start
            if round_:
                times[which].append(elapsed)
    base, ours = (statistics.median(t) * 1e3 for t in times)
    return {"side_by_side_baseline_ms": base, "side_by_side_ms": ours, "side_by_side_speedup": base / ours}


def median_ms(call, rounds=15, before=None):
    """Median milliseconds of `call` over `rounds` runs (after one untimed warm-up), each after
    an untimed `before()` if given (which sets up the state the call should find)."""
    times = []
    for round_ in range(rounds + 1):
        if before:
            before()
        start = time.perf_counter()
        call()
        if round_:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
