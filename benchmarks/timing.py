"""Timing helpers shared by every system measured, so that the fabric and its peers are
timed by the same code.  Every measurement is a list of samples reduced to median, min
and max: the median resists the outliers a small shared machine produces, and min and
max show how far they went."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np


def summary(samples: Sequence[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_call_ns(fn: Callable[[], object], calls: int) -> list[int]:
    """Each call timed on its own with ``perf_counter_ns`` (about 50 ns of its own cost)."""
    clock = time.perf_counter_ns
    times = []
    for _ in range(calls):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def read(get: Callable[[], np.ndarray], calls: int, sum_calls: int) -> dict:
    """How one reader process sees one object, whatever system holds it.  ``cold``: the
    first ``get()`` of it in this process plus touching one element, timed alone.  Then,
    with that view alive: ``warm``, the median of ``calls`` timed ``get()[0]``; ``sum``,
    the median of ``sum_calls`` timed ``get().sum()``, after one untimed sum has faulted
    the pages into this process.  Nanoseconds."""
    t0 = time.perf_counter_ns()
    held = get()
    held[0]
    cold = time.perf_counter_ns() - t0
    warm = statistics.median(per_call_ns(lambda: get()[0], calls))
    held.sum()
    total = statistics.median(per_call_ns(lambda: get().sum(), sum_calls))
    return {"cold": cold, "warm": warm, "sum": total}
