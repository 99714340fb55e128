"""Timing shared by the benches: each contender is timed in turn within every round, so a slow
spell of a shared machine hits all of them alike, and medians are compared."""

from __future__ import annotations

import statistics
import time


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn) for _ in range(runs))


def interleaved_times(fns: dict, runs: int, warm_up: bool = True) -> dict:
    """Each function's time in each of `runs` rounds (after one warm-up call each, unless the caller
    has warmed them up)."""
    if warm_up:
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def interleaved_medians(fns: dict, runs: int) -> dict:
    """Median time of each function over `runs` rounds, after one warm-up call each."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, runs).items()}
