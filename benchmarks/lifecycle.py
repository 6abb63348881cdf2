"""Defragment: how fast the fabric compacts a fragmented block, against the cost of moving
the same bytes in the same pattern with ``ctypes.memmove`` within one pre-faulted segment.

A round inserts 8 MiB variables from a task on A, deletes every other one, and times
``fabric.defragment()`` from the client (wall time: the RPCs to the YellowPages and to A
are part of what a user waits for).  Compaction then slides the k-th survivor from slot
2k+1 to slot k; the baseline does exactly those moves.  (The create+seal vs insert rows of
this group come from the put rounds: ``put.py``.)
"""

from __future__ import annotations

import ctypes
import uuid

import numpy as np
from distributed import Client

import datafabric
from benchmarks.cluster import MiB, Plan, make_array, size_label
from benchmarks.report import row
from benchmarks.timing import seconds
from datafabric.shm import Segment, new_block_name

VARIABLE_BYTES = 8 * MiB


def insert_many(fabric: datafabric.Fabric, prefix: str, count: int) -> None:
    arr = make_array(VARIABLE_BYTES)
    for i in range(count):
        fabric.insert(f"{prefix}/{i}", "benchmark", np.float64, arr)


def memmove_pattern(nbytes: int, moves: int, run_id: uuid.UUID) -> float:
    """Seconds of ``moves`` memmoves of ``nbytes``, the k-th from slot 2k+1 to slot k."""
    seg = Segment.create(new_block_name(run_id, "baseline"), 2 * moves * nbytes)
    try:
        base = seg.address
        return seconds(
            lambda: [ctypes.memmove(base + k * nbytes, base + (2 * k + 1) * nbytes, nbytes) for k in range(moves)]
        )
    finally:
        seg.close()
        seg.unlink()


def defragment_rows(client: Client, fabric: datafabric.Fabric, a: str, plan: Plan) -> list[dict]:
    count = plan.defrag_count
    moved, fabric_s, memmove_s, reports = [], [], [], []
    for r in range(1 + plan.defrag_reps):
        prefix = f"benchmark/defrag/{r}"
        client.submit(insert_many, fabric, prefix, count, workers=[a], pure=False).result()
        for i in range(0, count, 2):
            fabric.delete(f"{prefix}/{i}")
        report = {}
        fabric_s.append(seconds(lambda: report.update(fabric.defragment())))  # noqa: B023
        for i in range(1, count, 2):
            fabric.delete(f"{prefix}/{i}")
        nbytes = sum(b["bytes_moved"] for b in report["blocks"])
        moves = max(1, len(report["moved"]))
        memmove_s.append(
            client.submit(memmove_pattern, nbytes // moves, moves, plan.run_id, workers=[a], pure=False).result()
        )
        moved.append(nbytes)
        reports.append(
            [{k: b[k] for k in ("bytes_moved", "largest_free_before", "largest_free_after")} for b in report["blocks"]]
        )
    category = f"{count} × {size_label(VARIABLE_BYTES)}, every other one deleted"
    return [
        row("lifecycle", "lifecycle/defragment", "defragment: bytes moved / client wall time", "fabric", "GB/s",
            [b / s / 1e9 for b, s in zip(moved, fabric_s, strict=True)], category=category, panel="defragment",
            series="fabric defragment", base=("lifecycle/memmove", "limit"), detail={"blocks": reports}),
        row("lifecycle", "lifecycle/memmove", "ctypes.memmove of the same bytes, same moves, one segment, task on A",
            "limit", "GB/s", [b / s / 1e9 for b, s in zip(moved, memmove_s, strict=True)], category=category,
            panel="defragment", series="ctypes.memmove (limit)"),
    ]  # fmt: skip
