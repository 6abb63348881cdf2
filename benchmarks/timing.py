"""Timing helpers.  Every measurement is a list of samples reduced to median, min and
max: the median resists the outliers a small shared machine produces, and min and max
show how far they went."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def summary(samples: Sequence[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def per_call_ns(fn: Callable[[], object], calls: int) -> list[int]:
    """Each call timed on its own with ``perf_counter_ns`` (about 50 ns of its own cost)."""
    clock = time.perf_counter_ns
    times = []
    for _ in range(calls):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times
