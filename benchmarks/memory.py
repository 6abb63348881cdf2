"""Memory: what it costs each of N processes on a node to hold one large variable.

For every holder, USS (pages only it maps) and PSS (each page divided by the number of
processes mapping it) from psutil's ``memory_full_info()``, after it got the object and
summed it (so every page is mapped) minus the same figures before.  With one copy in
shared memory a holder's USS should barely move and its PSS should shrink as N grows; with
Dask every holder has a copy of its own.  Each system gets fresh processes, warmed up by a
first task, so that no holder carries another system's pages or a first task's imports.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import psutil
from distributed import Client

import datafabric
from benchmarks.cluster import MiB, Plan, fabric_on, local_cluster, make_array, size_label, workers
from benchmarks.peers import RayHolder
from benchmarks.report import SYSTEMS, row

NAME = "benchmark/memory"
_held: list[np.ndarray] = []  # views (or copies) a holder keeps alive between tasks


def _ready() -> None:
    """A first task: imports this module and starts the worker's task thread."""


def _mem(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.uss / MiB, info.pss / MiB


def _create(fabric: datafabric.Fabric, nbytes: int) -> None:
    """In a task on the owner: filled in place, so the owner has no private copy either."""
    with fabric.create(NAME, "benchmark", f"{nbytes // 8} * float64", fill=None) as out:
        out.fill(1.0)


def _hold_fabric(fabric: datafabric.Fabric) -> None:
    view = fabric.get(NAME)
    view.sum()
    _held.append(view)


def _drop() -> None:
    _held.clear()


def _sum(x: np.ndarray) -> float:
    return x.sum()


def _rows(system: str, n: int, before: dict, after: dict, size: str) -> list[dict]:
    keys = list(after)
    detail = {"before_uss_pss_mib": [before[k] for k in keys], "after_uss_pss_mib": [after[k] for k in keys]}
    out = []
    for i, kind in enumerate(("USS", "PSS")):
        deltas = [after[k][i] - before[k][i] for k in keys]
        out.append(
            row(
                "memory",
                f"memory/{n}/{system}-{kind}",
                f"Δ{kind} per holder, {n} holders of {size}",
                system,
                "MiB",
                deltas,
                category=f"N = {n}",
                panel="memory",
                series=f"{SYSTEMS[system]} Δ{kind}",
                warmup=0,
                fabric=f"memory/{n}/fabric-PSS" if kind == "PSS" and system != "fabric" else None,
                detail=detail if kind == "USS" else None,
            )
        )
    return out


def _baseline(client: Client, new: list[str], pids: dict, before: dict) -> None:
    """The pids and before-figures of workers that just joined, after a first task."""
    pids.update(client.run(os.getpid, workers=new))
    client.gather([client.submit(_ready, workers=[w], pure=False) for w in new])
    before.update({w: _mem(pids[w]) for w in new})


def fabric_rows(plan: Plan) -> list[dict]:
    """One worker owns the block and creates the variable; N more join and hold views."""
    rows, size = [], size_label(plan.memory_bytes)
    with local_cluster(1) as (cluster, client):
        [owner] = workers(client)
        with fabric_on(client, mb=plan.memory_bytes / MiB + 64) as fabric:
            client.submit(_create, fabric, plan.memory_bytes, workers=[owner], pure=False).result()
            pids: dict[str, int] = {}
            before: dict[str, tuple] = {}
            try:
                for n in plan.holders:
                    cluster.scale(1 + n)
                    client.wait_for_workers(1 + n)
                    holders = [w for w in workers(client) if w != owner]
                    new = [w for w in holders if w not in before]
                    _baseline(client, new, pids, before)
                    client.gather([client.submit(_hold_fabric, fabric, workers=[w], pure=False) for w in new])
                    rows += _rows("fabric", n, before, {w: _mem(pids[w]) for w in holders}, size)
            finally:
                client.run(_drop)
    return rows


def dask_rows(plan: Plan) -> list[dict]:
    """N workers, each holding its own copy of one scattered array."""
    rows, size = [], size_label(plan.memory_bytes)
    for n in plan.holders:
        with local_cluster(n) as (_, client):
            holders, pids, before = workers(client), {}, {}
            _baseline(client, holders, pids, before)
            data = client.scatter(make_array(plan.memory_bytes), broadcast=True, hash=False)
            client.gather([client.submit(_sum, data, workers=[w], pure=False) for w in holders])
            rows += _rows("dask", n, before, {w: _mem(pids[w]) for w in holders}, size)
            del data
    return rows


def ray_rows(ray: Any, plan: Plan) -> list[dict]:
    """N actors, each holding a ``ray.get`` view of one object put by the driver."""
    rows, size = [], size_label(plan.memory_bytes)
    ref = ray.put(make_array(plan.memory_bytes))
    actors: list = []
    pids: dict = {}
    before: dict = {}
    try:
        for n in plan.holders:
            new = [ray.remote(num_cpus=0)(RayHolder).remote() for _ in range(n - len(actors))]
            for a in new:
                pids[a] = ray.get(a.pid.remote())
                before[a] = _mem(pids[a])
            actors += new
            ray.get([a.hold.remote([ref]) for a in new])
            rows += _rows("ray", n, before, {a: _mem(pids[a]) for a in actors}, size)
    finally:
        for a in actors:
            ray.kill(a)
        del ref
    return rows
