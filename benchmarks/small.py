"""Small objects: many puts of a 1 KiB array, one call per object, in objects per second.

This is where per-call overhead (an RPC, a lock, a round trip to a daemon) shows, not
bandwidth.  The fabric is measured both ways from a task on A: plain ``insert`` in a loop
(one seal RPC each) and ``insert_many`` (one seal RPC per batch); Dask's batched ``scatter``
of a list shows what batching buys it.
Nothing is deleted between batches: every object stays until its system is shut down.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from distributed import Client

import datafabric
from benchmarks.cluster import Plan
from benchmarks.report import SYSTEMS, row
from benchmarks.timing import seconds

BATCHES = 5
CATEGORY = "1 KiB"


def one_kib() -> np.ndarray:
    return np.ones(128)


def _batches(put_many: Callable[[int], object], n: int) -> list[float]:
    """Objects per second of a warm-up batch of n/10 puts, then of BATCHES batches of n/BATCHES."""
    out = []
    for k in [max(1, n // 10)] + [n // BATCHES] * BATCHES:
        out.append(k / seconds(lambda: put_many(k)))  # noqa: B023
    return out


def insert_loop(fabric: datafabric.Fabric, n: int) -> list[float]:
    """In a task on A."""
    x, numbers = one_kib(), itertools.count()

    def put_many(k: int) -> None:
        for _ in range(k):
            fabric.insert(f"benchmark/small/{next(numbers)}", "1 KiB", np.float64, x)

    return _batches(put_many, n)


def insert_batched(fabric: datafabric.Fabric, n: int) -> list[float]:
    """In a task on A: each batch is one ``insert_many``."""
    x, numbers = one_kib(), itertools.count()

    def put_many(k: int) -> None:
        fabric.insert_many((f"benchmark/batched/{next(numbers)}", "1 KiB", np.float64, x) for _ in range(k))

    return _batches(put_many, n)


def _row(key: str, measurement: str, system: str, samples: list[float], series: str) -> dict:
    return row(
        "small",
        f"small/{key}",
        measurement,
        system,
        "ops/s",
        samples,
        category=CATEGORY,
        panel="small",
        series=series,
        fabric=None if system == "fabric" else "small/fabric-batched",
    )


def fabric_and_dask(client: Client, fabric: datafabric.Fabric, a: str, plan: Plan) -> list[dict]:
    fab = client.submit(insert_loop, fabric, plan.small, workers=[a], pure=False).result()
    fab_batched = client.submit(insert_batched, fabric, plan.small, workers=[a], pure=False).result()
    x, held = one_kib(), []
    loop = _batches(lambda k: held.extend(client.scatter(x, workers=[a], hash=False) for _ in range(k)), plan.small)
    batched = _batches(lambda k: held.extend(client.scatter([x] * k, workers=[a], hash=False)), plan.small)
    held.clear()
    return [
        _row("fabric", "insert in a loop, task on A", "fabric", fab, "fabric insert"),
        _row(
            "fabric-batched", "insert_many (one seal per batch), task on A", "fabric", fab_batched, "fabric insert_many"
        ),
        _row("dask", "scatter in a loop, client to A", "dask", loop, "Dask scatter"),
        _row("dask-batched", "scatter of a list (batched), client to A", "dask", batched, "Dask scatter batched"),
    ]


def peer_rows(
    system: str, put: Callable[[np.ndarray], Any], delete: Callable[[list], object], plan: Plan
) -> list[dict]:
    """``put`` stores one array and returns its handle; ``delete`` frees all of them."""
    x, held = one_kib(), []
    try:
        samples = _batches(lambda k: held.extend(put(x) for _ in range(k)), plan.small)
    finally:
        delete(held)
    return [_row(system, "put in a loop from the client", system, samples, f"{SYSTEMS[system]} put")]
