"""The core benchmark: insert bandwidth and get latency, each next to its baseline.

Insert is judged against the physical limit, ``np.copyto`` of the same array into shared
memory that is already pre-faulted, in the same process, alternating with the inserts so
that both see the same machine.  A get in another worker is judged against the cheapest
zero-copy read there is (a numpy view of a segment that process attached itself) and
against Dask's own way of getting the array there (scatter it to worker A, run a task on
worker B that depends on it).  Every timed loop starts with one round of warm-up: the
first sample of each list in the raw results.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid

import numpy as np
from distributed import Client, LocalCluster

import datafabric
from benchmarks.timing import per_call_ns
from datafabric.shm import PREFIX, Segment, new_block_name

MiB = 2**20
NAME = "benchmark/array"


def make_array(nbytes: int) -> np.ndarray:
    """A float64 array with every page touched, so that no timing pays for its faults."""
    return np.arange(nbytes // 8, dtype=np.float64)


# -- 1. insert -----------------------------------------------------------------------------
def insert_vs_copyto(fabric: datafabric.Fabric, arr: np.ndarray, repeat: int, run_id: uuid.UUID) -> dict:
    """Seconds per ``fabric.insert(arr)`` and per ``np.copyto`` of ``arr`` into a pre-faulted
    segment, alternately: at the segment's start (page-aligned: the physical limit), and at
    the insert's offset within a page, since for copies past glibc's non-temporal threshold
    the destination's alignment relative to the source can cost a factor of 4.  An insert
    holds no lease, so the delete after it frees the extent and every round finds the same
    room."""
    seg = Segment.create(new_block_name(run_id, "baseline"), arr.nbytes + mmap.PAGESIZE)
    try:
        times: dict[str, list] = {"insert": [], "copyto": [], "copyto_at_offset": []}
        for _ in range(1 + repeat):
            t0 = time.perf_counter()
            locations = fabric.insert(NAME, "benchmark", arr.dtype, arr)
            times["insert"].append(time.perf_counter() - t0)
            fabric.delete(NAME)
            page_offset = locations[0][2] % mmap.PAGESIZE
            for key, offset in [("copyto", 0), ("copyto_at_offset", page_offset)]:
                dest = np.frombuffer(seg.buf, arr.dtype, count=arr.size, offset=offset)
                t0 = time.perf_counter()
                np.copyto(dest, arr)
                times[key].append(time.perf_counter() - t0)
                del dest
    finally:
        seg.close()
        seg.unlink()
    return times | {"page_offset": page_offset, "source_page_offset": arr.ctypes.data % mmap.PAGESIZE}


def insert_in_task(fabric: datafabric.Fabric, nbytes: int, repeat: int, run_id: uuid.UUID) -> dict:
    return insert_vs_copyto(fabric, make_array(nbytes), repeat, run_id)


# -- 2. get in another worker ----------------------------------------------------------------
def insert_once(fabric: datafabric.Fabric, nbytes: int) -> tuple[str, str, int]:
    [location] = fabric.insert(NAME, "benchmark", np.float64, make_array(nbytes))
    return location


def warm_get_in_task(fabric: datafabric.Fabric, location: tuple[str, str, int], calls: int, repeat: int) -> dict:
    """One cold get (nanoseconds, timed alone); then, with its view alive, batches of
    ``calls`` gets + touching one element, each call timed, alternating with batches of
    the baseline: a numpy view of the same bytes through a mapping of this task's own."""
    _, shm_id, offset = location
    t0 = time.perf_counter_ns()
    held = fabric.get(NAME)
    cold = time.perf_counter_ns() - t0
    seg = Segment.attach(shm_id)
    count = held.size
    try:
        calls_of = {
            "get": lambda: fabric.get(NAME)[0],
            "raw": lambda: np.frombuffer(seg.buf, np.float64, count=count, offset=offset)[0],
        }
        stats = {key: {"median_ns": [], "p99_ns": []} for key in calls_of}
        for _ in range(1 + repeat):
            for key, fn in calls_of.items():
                median, p99 = np.percentile(per_call_ns(fn, calls), [50, 99])
                stats[key]["median_ns"].append(float(median))
                stats[key]["p99_ns"].append(float(p99))
    finally:
        seg.close()
    return {"cold_ns": cold, **stats}


def insert_small(fabric: datafabric.Fabric, names: list[str]) -> None:
    for name in names:
        fabric.insert(name, "benchmark", np.float64, np.ones(1024))


def first_gets_in_task(fabric: datafabric.Fabric, names: list[str]) -> list[int]:
    """Nanoseconds of the first get of each name in this process; views kept alive, so no
    lease is released while the others are timed."""
    views, times = [], []
    for name in names:
        t0 = time.perf_counter_ns()
        views.append(fabric.get(name))
        times.append(time.perf_counter_ns() - t0)
    return times


def dask_fetch(client: Client, arr: np.ndarray, a: str, b: str, repeat: int) -> dict:
    """Seconds of ``submit(x[0], scattered, workers=[B]).result()`` seen by the client, with a
    fresh scatter to A each round; and the transfer alone, as B's transfer log has it."""
    wall, transfer = [], []
    for _ in range(1 + repeat):
        data = client.scatter(arr, workers=[a], hash=False)
        t0 = time.perf_counter()
        client.submit(_first, data, workers=[b], pure=False).result()
        wall.append(time.perf_counter() - t0)
        transfer.append(client.run(_transfer_seconds, data.key, workers=[b])[b])
        del data
    return {"wall": wall, "transfer": transfer}


def _first(x: np.ndarray) -> float:
    return x[0]


def _transfer_seconds(key: str, dask_worker=None) -> float:
    return next(t["duration"] for t in reversed(dask_worker.transfer_incoming_log) if key in t["keys"])


# -- the run -------------------------------------------------------------------------------
def run(nbytes: int, repeat: int, calls: int, fresh_names: int) -> dict:
    """Everything on one LocalCluster: two worker processes A and B, one thread each."""
    run_id = uuid.uuid4()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        ) as cluster,
        Client(cluster) as client,
    ):
        a, b = sorted(client.scheduler_info()["workers"])
        fabric = datafabric.start(client, mb=2 * (nbytes / MiB + 16))  # one block per worker, each fits the array
        try:
            arr = make_array(nbytes)
            results = {
                "insert_worker": client.submit(insert_in_task, fabric, nbytes, repeat, run_id, workers=[a]).result(),
                "insert_client": insert_vs_copyto(fabric, arr, repeat, run_id),
            }
            location = client.submit(insert_once, fabric, nbytes, workers=[a]).result()
            results["get"] = client.submit(warm_get_in_task, fabric, location, calls, repeat, workers=[b]).result()
            fabric.delete(NAME)
            names = [f"benchmark/small/{i}" for i in range(1 + fresh_names)]  # the first is warm-up
            client.submit(insert_small, fabric, names, workers=[a]).result()
            results["cold_get_ns"] = client.submit(first_gets_in_task, fabric, names, workers=[b]).result()
            results["dask"] = dask_fetch(client, arr, a, b, repeat)
        finally:
            fabric.shutdown()
            left = _left_in_dev_shm(fabric.fabric_id, run_id)
    return results | {"left_in_dev_shm": left}


def _left_in_dev_shm(fabric_id: str, run_id: uuid.UUID) -> list[str]:
    ours = (f"{PREFIX}{fabric_id[:8]}_", f"{PREFIX}{run_id.hex[:8]}_")
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(ours)) if os.path.isdir("/dev/shm") else []
