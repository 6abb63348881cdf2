"""Put: one array into each system, timed as its writer sees it, next to the physical limit.

The limit is ``np.copyto`` of the same array into shared memory that is already pre-faulted,
in the same process, alternating with the fabric's calls so that both see the same machine.
The fabric writes from a task on worker A, its main path (``insert``; ``create`` filled with
``np.copyto``; and create+seal with no fill, which is the fixed cost), and from the client.
Dask scatters from the client to A; Ray and Vineyard put from the client, their driver.
"""

from __future__ import annotations

import functools
import mmap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from distributed import Client

import datafabric
from benchmarks.cluster import Plan, make_array, size_label
from benchmarks.report import SYSTEMS, row
from benchmarks.timing import seconds
from datafabric.shm import Segment, new_block_name

NAME = "benchmark/put"


@contextmanager
def _copyto_limit(run_id: uuid.UUID, arr: np.ndarray) -> Iterator[Callable[[], None]]:
    """``np.copyto`` of ``arr`` into a pre-faulted, page-aligned segment of its own."""
    seg = Segment.create(new_block_name(run_id, "baseline"), arr.nbytes)
    dest = [np.frombuffer(seg.buf, arr.dtype, count=arr.size)]
    try:
        yield lambda: np.copyto(dest[0], arr)
    finally:
        dest.clear()  # no view of the mapping left, so it unmaps now
        seg.close()
        seg.unlink()


def _rounds(ops: dict, reps: int, after: dict) -> dict[str, list[float]]:
    """Seconds of each op, one round of all of them at a time; ``after[key]`` (untimed)
    undoes what the op left, so every round finds the same room."""
    times: dict[str, list[float]] = {key: [] for key in ops}
    for _ in range(1 + reps):
        for key, op in ops.items():
            times[key].append(seconds(op))
            if key in after:
                after[key]()
    return times


def in_task(fabric: datafabric.Fabric, nbytes: int, reps: int, run_id: uuid.UUID) -> dict:
    """In a task on A: rounds of insert, create+fill, create+seal and the limit."""
    arr = make_array(nbytes)
    tp = f"{arr.size} * float64"
    placed = []

    def create_fill() -> None:
        with fabric.create(NAME, "benchmark", tp, fill=None) as out:  # every byte is written
            np.copyto(out, arr)

    def create_seal() -> None:
        with fabric.create(NAME, "benchmark", tp, fill=None):  # the fixed cost alone
            pass

    delete = lambda: fabric.delete(NAME)  # noqa: E731
    with _copyto_limit(run_id, arr) as copyto:
        ops = {
            "insert": lambda: placed.append(fabric.insert(NAME, "benchmark", arr.dtype, arr)),
            "create+fill": create_fill,
            "create+seal": create_seal,
            "copyto": copyto,
        }
        times = _rounds(ops, reps, {"insert": delete, "create+fill": delete, "create+seal": delete})
    return times | {"data_page_offset": placed[0][0][2] % mmap.PAGESIZE}


def from_client(client: Client, fabric: datafabric.Fabric, a: str, nbytes: int, reps: int, run_id: uuid.UUID) -> dict:
    """In the client: rounds of insert, the limit, and Dask's scatter to A."""
    arr = make_array(nbytes)
    scattered = []
    with _copyto_limit(run_id, arr) as copyto:
        ops = {
            "insert": lambda: fabric.insert(NAME, "benchmark", arr.dtype, arr),
            "copyto": copyto,
            "scatter": lambda: scattered.append(client.scatter(arr, workers=[a], hash=False)),
        }
        return _rounds(ops, reps, {"insert": lambda: fabric.delete(NAME), "scatter": scattered.clear})


def _bandwidth_row(
    size: str, nbytes: int, key: str, measurement: str, system: str, samples: list, base: str, series: str, **kw
) -> dict:
    """A put row in GB/s; ``base`` and ``series`` may be empty (no baseline, not plotted)."""
    return row(
        "put",
        f"put/{size}/{key}",
        measurement,
        system,
        "GB/s",
        [nbytes / s / 1e9 for s in samples],
        category=size,
        panel="put" if series else None,
        series=series or None,
        base=(f"put/{size}/{base}", "limit") if base else None,
        **kw,
    )


def fabric_and_dask(client: Client, fabric: datafabric.Fabric, a: str, plan: Plan) -> list[dict]:
    rows = []
    for nbytes in plan.sizes:
        size, reps = size_label(nbytes), plan.reps(nbytes)
        task = client.submit(in_task, fabric, nbytes, reps, plan.run_id, workers=[a], pure=False).result()
        cl = from_client(client, fabric, a, nbytes, reps, plan.run_id)

        bw = functools.partial(_bandwidth_row, size, nbytes)
        rows += [
            bw("copyto-task", f"np.copyto {size} into pre-faulted shm, task on A", "limit", task["copyto"], "", "np.copyto (limit)"),
            bw("insert-task", f"insert {size}, task on A", "fabric", task["insert"], "copyto-task", "fabric insert",
               detail={"data_page_offset": task["data_page_offset"]}),
            bw("create-task", f"create + np.copyto fill {size}, task on A", "fabric", task["create+fill"], "copyto-task", "fabric create+fill"),
            bw("copyto-client", f"np.copyto {size} into pre-faulted shm, client", "limit", cl["copyto"], "", ""),
            bw("insert-client", f"insert {size}, from the client", "fabric", cl["insert"], "copyto-client", ""),
            bw("scatter", f"scatter {size} from the client to A", "dask", cl["scatter"], "copyto-client", "Dask scatter", fabric=f"put/{size}/insert-task"),
        ]  # fmt: skip
        if nbytes == plan.sizes[-1]:
            rows += _create_vs_insert(size, task)
    return rows


def _create_vs_insert(size: str, task: dict) -> list[dict]:
    """The same rounds as the put rows of the largest size, in milliseconds: what a
    producer pays for ``create`` (with its own fill, or none) against ``insert``."""

    def ms(key: str, measurement: str) -> dict:
        base = ("lifecycle/insert", "insert") if key != "insert" else None
        samples = [s * 1e3 for s in task[key]]
        return row("lifecycle", f"lifecycle/{key}", measurement, "fabric", "ms", samples, category=size, base=base)

    return [
        ms("insert", f"insert {size}, task on A"),
        ms("create+fill", f"create + np.copyto fill + seal {size}, task on A"),
        ms("create+seal", f"create + seal {size}, no fill (the fixed cost)"),
    ]


def peer_rows(system: str, put: Callable[[np.ndarray], Any], delete: Callable[[Any], object], plan: Plan) -> list[dict]:
    """``put(arr)`` stores ``arr`` in the peer and returns its handle, which ``delete`` frees."""
    rows = []
    for nbytes in plan.sizes:
        size, arr, times = size_label(nbytes), make_array(nbytes), []
        for _ in range(1 + plan.reps(nbytes)):
            t0 = time.perf_counter()
            handle = put(arr)
            times.append(time.perf_counter() - t0)
            delete(handle)
            del handle
        rows.append(
            row(
                "put",
                f"put/{size}/{system}",
                f"put {size} from the client",
                system,
                "GB/s",
                [nbytes / s / 1e9 for s in times],
                category=size,
                panel="put",
                series=f"{SYSTEMS[system]} put",
                base=(f"put/{size}/copyto-client", "limit"),
                fabric=f"put/{size}/insert-task",
            )
        )
    return rows
