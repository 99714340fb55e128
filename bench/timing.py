"""Timing shared by the benches: each contender is timed in turn within every round, so a slow
spell of a shared machine hits all of them alike, and medians are compared."""

from __future__ import annotations

import platform
import statistics
import time


def machine() -> str:
    """The CPU a bench ran on, with its widest vector extension: GEMM-bound ratios move with it
    (the `tiny` train step: 1.16x transformers on an AVX-512/AMX Xeon, 1.40x on an AVX2 EPYC)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}{', AMX' if 'amx_tile' in flags else ''})"


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
