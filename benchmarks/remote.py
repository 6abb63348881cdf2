"""Reading a variable that lives on another node, against Dask's own worker-to-worker
transfer of the same array, on two simulated nodes (two worker processes with distinct
node ids: the fabric treats them exactly as two machines, so the bytes cross Dask's comms).

Both sides are timed the same way: the client's wall time of one task on node B that
reads an array held on node A and touches it.  The fabric's first read on B fetches the
bytes and keeps them as a replica on B; after that, reads on B are local.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from distributed import Client, Nanny, Scheduler, SpecCluster

import datafabric
from benchmarks.timing import per_call_ns, summary

NODES = ("node-a", "node-b")


def two_nodes() -> SpecCluster:
    workers = {
        node: {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": {"DASK_DATAFABRIC__NODE_ID": node}}}
        for node in NODES
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, asynchronous=False)


def insert_on(fabric: datafabric.Fabric, name: str, nbytes: int) -> None:
    fabric.insert(name, "", np.float64, np.ones(nbytes // 8))


def touch(fabric: datafabric.Fabric, name: str, cache: bool) -> float:
    view = fabric.get(name, cache=cache)
    return float(view[0] + view[-1])


def touch_array(x: np.ndarray) -> float:
    return float(x[0] + x[-1])


def local_get_latency(fabric: datafabric.Fabric, name: str, calls: int) -> dict:
    """On node B once the replica exists: the first get in this task's process (one RPC,
    no bytes move) and then gets while that view is alive."""
    t0 = time.perf_counter_ns()
    held = fabric.get(name)
    held[0]
    first = time.perf_counter_ns() - t0
    warm = statistics.median(per_call_ns(lambda: fabric.get(name)[0], calls))
    return {"first_us": first / 1e3, "warm_us": warm / 1e3}


def timed(client: Client, fn, *args, worker: str) -> float:
    t0 = time.perf_counter()
    client.submit(fn, *args, workers=[worker], pure=False).result()
    return time.perf_counter() - t0


def run(nbytes: int, repeat: int) -> dict:
    with two_nodes() as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        env = client.run(lambda: __import__("dask").config.get("datafabric.node-id"))
        a = next(w for w, n in env.items() if n == "node-a")
        b = next(w for w, n in env.items() if n == "node-b")
        fabric = datafabric.start(client, mb=2 * 3 * nbytes / 2**20)
        try:
            samples: dict[str, list[float]] = {"fabric_replica": [], "fabric_private": [], "dask": []}
            latency = []
            for i in range(repeat + 1):  # the first round warms connections up
                for how, cache in (("fabric_replica", True), ("fabric_private", False)):
                    name = f"bench/{how}/{i}"
                    client.submit(insert_on, fabric, name, nbytes, workers=[a], pure=False).result()
                    elapsed = timed(client, touch, fabric, name, cache, worker=b)
                    if how == "fabric_replica":
                        assert len(fabric.get_locations(name)) == 2
                        latency.append(
                            client.submit(local_get_latency, fabric, name, 10_000, workers=[b], pure=False).result()
                        )
                    fabric.delete(name)
                    if i:
                        samples[how].append(elapsed)
                [future] = client.scatter([np.ones(nbytes // 8)], workers=[a])
                elapsed = timed(client, touch_array, future, worker=b)
                del future
                if i:
                    samples["dask"].append(elapsed)
        finally:
            fabric.shutdown()
    result = {k: summary(v) for k, v in samples.items()}
    result["local_first_us"] = summary([x["first_us"] for x in latency[1:]])
    result["local_warm_us"] = summary([x["warm_us"] for x in latency[1:]])
    result["nbytes"] = nbytes
    return result


def table(result: dict) -> str:
    gb = result["nbytes"] / 1e9
    dask = result["dask"]["median"]
    rows = [
        "| measurement | median | min | max | unit | vs Dask |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for key, label in (
        ("fabric_replica", "fabric remote get, lands as a replica on B"),
        ("fabric_private", "fabric remote get, cache=False (private copy)"),
        ("dask", "Dask: scattered to A, used by a task on B"),
    ):
        s = result[key]
        rows.append(
            f"| {label} | {gb / s['median']:.2f} | {gb / s['max']:.2f} | {gb / s['min']:.2f} | GB/s | {dask / s['median']:.2f}x |"
        )
    for key, label in (
        ("local_first_us", "get on B after the replica exists, first in a process"),
        ("local_warm_us", "get on B after the replica exists, view alive"),
    ):
        s = result[key]
        rows.append(f"| {label} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} | µs | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB, fewer repetitions")
    args = parser.parse_args()
    nbytes, repeat = (256 * 2**20, 3) if args.quick else (2**30, 5)
    result = run(nbytes, repeat)
    print(f"remote get of {nbytes / 2**20:.0f} MiB across two simulated nodes, {repeat} repetitions after 1 warm-up")
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
