"""Get in another worker process on the same node: what it costs B to read an array that
A (or the client) put, for every system, timed in the reader by the same ``timing.read``.

The baseline is the cheapest zero-copy read there is: a numpy view of the same bytes in a
segment B attached itself.  Each round puts a fresh object, so ``cold`` is always its first
get in B; for the fabric that is a fresh name (the first get of all also maps A's block:
its own row).  Dask has no shared memory, so its get is a transfer: scatter to A, then a
task on B that uses the array.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from distributed import Client

import datafabric
from benchmarks.cluster import Plan, make_array, size_label
from benchmarks.peers import RayHolder, vineyard_read
from benchmarks.report import SYSTEMS, row
from benchmarks.timing import read
from datafabric.shm import Segment

_raw: dict[str, Segment] = {}  # B's own mappings of fabric blocks, for the baseline


def insert_fresh(fabric: datafabric.Fabric, name: str, nbytes: int) -> tuple[str, str, int]:
    [location] = fabric.insert(name, "benchmark", np.float64, make_array(nbytes))
    return location


def read_fabric(fabric: datafabric.Fabric, name: str, location: tuple, nbytes: int, calls: int, sum_calls: int) -> dict:
    """In a task on B: the fabric's get, then the raw view of the same bytes.  Every view
    is dropped on return, so the name's lease ends and it can be deleted."""
    _, shm_id, offset = location
    got = read(lambda: fabric.get(name), calls, sum_calls)
    seg = _raw.get(shm_id) or _raw.setdefault(shm_id, Segment.attach(shm_id))
    raw = read(lambda: np.frombuffer(seg.buf, np.float64, count=nbytes // 8, offset=offset), calls, sum_calls)
    return {"fabric": got, "raw": raw}


def close_raw() -> None:
    while _raw:
        _raw.popitem()[1].close()


def _first(x: np.ndarray) -> float:
    return x[0]


def _sum(x: np.ndarray) -> float:
    return x.sum()


def _transfer_seconds(key: str, dask_worker: Any = None) -> float:
    return next(t["duration"] for t in reversed(dask_worker.transfer_incoming_log) if key in t["keys"])


def _dask_rounds(client: Client, arr: np.ndarray, a: str, b: str, rounds: int) -> dict:
    """Client wall seconds of a task on B that touches (or sums) an array scattered to A
    just before (untimed), and the touch's transfer as B's transfer log has it."""
    out: dict[str, list[float]] = {"touch": [], "transfer": [], "sum": []}
    for _ in range(rounds):
        for key, fn in (("touch", _first), ("sum", _sum)):
            data = client.scatter(arr, workers=[a], hash=False)
            t0 = time.perf_counter()
            client.submit(fn, data, workers=[b], pure=False).result()
            out[key].append(time.perf_counter() - t0)
            if key == "touch":
                out["transfer"].append(client.run(_transfer_seconds, data.key, workers=[b])[b])
            del data
    return out


def _rows(system: str, size: str, per_round: list[dict]) -> list[dict]:
    """cold, warm and sum rows of one reader (only warm and sum for the limit, whose
    "cold" is no get at all); ``per_round`` holds ``timing.read`` results."""
    label = SYSTEMS[system]
    fabric = None if system in ("fabric", "limit") else f"get/{size}/fabric"

    def one(kind: str, measurement: str, unit_ns: float, unit: str, panel: str, series: str) -> dict:
        return row(
            "get",
            f"get/{size}/{system}-{kind}",
            measurement,
            system,
            unit,
            [r[kind] / unit_ns for r in per_round],
            category=size,
            panel=panel,
            series=series,
            base=(f"get/{size}/limit-{kind}", "limit") if system != "limit" and kind != "cold" else None,
            fabric=f"{fabric}-{kind}" if fabric else None,
        )

    if system == "limit":
        return [
            one("warm", f"numpy view of B's own mapping + touch, {size}", 1e3, "µs", "get-touch", "raw view (limit)"),
            one("sum", f"numpy view of B's own mapping + sum(), {size}", 1e6, "ms", "get-sum", "raw view (limit)"),
        ]
    return [
        one("cold", f"get + touch, {size}, first get of a fresh object", 1e3, "µs", "get-touch", f"{label} cold"),
        one("warm", f"get + touch, {size}, a view alive", 1e3, "µs", "get-touch", f"{label} warm"),
        one("sum", f"get + sum(), {size}, pages faulted in", 1e6, "ms", "get-sum", label),
    ]


def fabric_and_dask(client: Client, fabric: datafabric.Fabric, a: str, b: str, plan: Plan) -> list[dict]:
    rows = []
    try:
        for nbytes in plan.sizes:
            size, rounds, sum_calls = size_label(nbytes), 1 + plan.reps(nbytes), plan.sum_calls(nbytes)
            results = []
            for i in range(rounds):
                name = f"benchmark/get/{size}/{i}"
                location = client.submit(insert_fresh, fabric, name, nbytes, workers=[a], pure=False).result()
                args = (fabric, name, location, nbytes, plan.calls, sum_calls)
                task = client.submit(read_fabric, *args, workers=[b], pure=False)
                results.append(task.result())
                fabric.delete(name)
            if nbytes == plan.sizes[0]:
                first = results[0]["fabric"]["cold"] / 1e3
                rows.append(
                    row("get", "get/first", "first get in B of all: maps A's block", "fabric", "µs", [first], category=size, warmup=0)
                )  # fmt: skip
            rows += _rows("fabric", size, [r["fabric"] for r in results])
            rows += _rows("limit", size, [r["raw"] for r in results])
            dask = _dask_rounds(client, make_array(nbytes), a, b, rounds)
            us = [s * 1e6 for s in dask["touch"]]
            rows += [
                row("get", f"get/{size}/dask-cold", f"task on B touches {size} scattered to A (client wall)", "dask", "µs", us,
                    category=size, panel="get-touch", series="Dask", fabric=f"get/{size}/fabric-cold"),
                row("get", f"get/{size}/dask-transfer", "↳ of which B's transfer (B's transfer log)", "dask", "µs",
                    [s * 1e6 for s in dask["transfer"]], category=size),
                row("get", f"get/{size}/dask-sum", f"task on B sums {size} scattered to A (client wall)", "dask", "ms",
                    [s * 1e3 for s in dask["sum"]], category=size, panel="get-sum", series="Dask", fabric=f"get/{size}/fabric-sum"),
            ]  # fmt: skip
    finally:
        client.submit(close_raw, workers=[b], pure=False).result()
    return rows


def ray_rows(ray: Any, plan: Plan) -> list[dict]:
    reader = ray.remote(num_cpus=0)(RayHolder).remote()
    rows = []
    try:
        for nbytes in plan.sizes:
            results = []
            for _ in range(1 + plan.reps(nbytes)):
                ref = ray.put(make_array(nbytes))
                results.append(ray.get(reader.read.remote([ref], plan.peer_calls, plan.sum_calls(nbytes))))
                del ref
            rows += _rows("ray", size_label(nbytes), results)
    finally:
        ray.kill(reader)
    return rows


def vineyard_rows(client: Client, b: str, vclient: Any, socket: str, plan: Plan) -> list[dict]:
    rows = []
    for nbytes in plan.sizes:
        results = []
        for _ in range(1 + plan.reps(nbytes)):
            oid = vclient.put(make_array(nbytes))
            task = client.submit(
                vineyard_read, socket, int(oid), plan.peer_calls, plan.sum_calls(nbytes), workers=[b], pure=False
            )
            results.append(task.result())
            vclient.delete(oid)
        rows += _rows("vineyard", size_label(nbytes), results)
    return rows
