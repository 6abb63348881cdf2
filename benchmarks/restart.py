"""How long a fabric takes to come back after its scheduler crashed, against how long Dask
itself takes to come back, in the same run.

A scheduler started with ``--preload datafabric.preload`` and one worker on each of two
simulated nodes, all separate processes.  The fabric holds many small variables and a
few large ones.  Each round SIGKILLs the scheduler (its workers close), starts a new
scheduler and new workers, and times from that start to (1) Dask ready: both workers
registered, and (2) the fabric back: every name listed again.  The YellowPages' own log
says how long taking each node's blocks back took (workers walking the headers, the
directory rebuilt); it starts as each worker registers, so it overlaps (1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time

import numpy as np
from distributed import Client

import datafabric
from benchmarks.timing import summary
from tests.processes import ProcessCluster

NODES = ("node-a", "node-b")
SMALL = 1024
LARGE = 64 * 2**20
LARGE_COUNT = 4
TOOK_BACK = re.compile(r"took back \d+ blocks of node \S+ holding (\d+) extents in ([0-9.]+) s")


def fill(fabric: datafabric.Fabric, small: int) -> None:
    """Runs in a task on each node: small variables in batches, then a few large ones."""
    from distributed import get_worker

    node = get_worker().plugins["datafabric"].node
    one = np.zeros(SMALL // 8)
    for start in range(0, small, 1000):
        fabric.insert_many([(f"{node}/small/{i}", "", np.float64, one) for i in range(start, min(small, start + 1000))])
    for i in range(LARGE_COUNT):
        fabric.insert(f"{node}/large/{i}", "", np.float64, np.full(LARGE // 8, float(i)))


def node_workers(client: Client) -> dict[str, str]:
    nodes = client.run(lambda: __import__("dask").config.get("datafabric.node-id"))
    return {node: worker for worker, node in nodes.items()}


def one_restart(cluster: ProcessCluster, expected: int) -> dict:
    t_kill = time.perf_counter()
    cluster.crash_scheduler()
    workers_gone = time.perf_counter() - t_kill
    t0 = time.perf_counter()
    cluster.start()
    with Client(cluster.address, timeout=60) as client:
        client.wait_for_workers(len(NODES))
        dask_ready = time.perf_counter() - t0
        fabric = datafabric.connect(client)
        while len(fabric.get_list()) < expected:
            time.sleep(0.005)
        fabric_back = time.perf_counter() - t0
        assert float(fabric.get(f"{NODES[1]}/large/{LARGE_COUNT - 1}", cache=False)[-1]) == LARGE_COUNT - 1
    with open(cluster.scheduler_log) as f:
        took_back = [(int(n), float(s)) for n, s in TOOK_BACK.findall(f.read())]
    assert sum(n for n, _ in took_back) == expected, took_back
    return {
        "workers_gone": workers_gone,
        "dask_ready": dask_ready,
        "fabric_back": fabric_back,
        "take_back_per_node": max(s for _, s in took_back),
    }


def run(small: int, rounds: int, log: str) -> dict:
    cluster = ProcessCluster(NODES, scheduler_log=log)
    cluster.start()
    expected = len(NODES) * (small + LARGE_COUNT)
    mb = 2 * (small * (SMALL + 256) + LARGE_COUNT * (LARGE + 8192)) / 2**20 + 16
    try:
        with Client(cluster.address, timeout=60) as client:
            client.wait_for_workers(len(NODES))
            fabric = datafabric.start(client, mb=mb)
            workers = node_workers(client)
            t0 = time.perf_counter()
            client.gather([client.submit(fill, fabric, small, workers=[w], pure=False) for w in workers.values()])
            insert_seconds = time.perf_counter() - t0
            assert len(fabric.get_list()) == expected
        samples = [one_restart(cluster, expected) for _ in range(rounds)]
        with Client(cluster.address, timeout=60) as client:
            datafabric.connect(client).shutdown()
    finally:
        cluster.stop()
    result = {key: summary([s[key] for s in samples]) for key in samples[0]}
    result.update(variables=expected, mb=mb, insert_seconds=insert_seconds, rounds=rounds)
    return result


def table(result: dict) -> str:
    dask = result["dask_ready"]["median"]
    rows = ["| measurement | median | min | max | vs Dask ready |", "|---|---:|---:|---:|---:|"]
    for key, label in (
        ("workers_gone", "scheduler SIGKILLed: until its workers have exited"),
        ("dask_ready", "restart: until both workers are registered (Dask alone)"),
        ("fabric_back", "restart: until every variable is listed again"),
        ("take_back_per_node", "taking one node's blocks back (slowest node; overlaps the above)"),
    ):
        s = result[key]
        rows.append(
            f"| {label} | {s['median']:.2f} s | {s['min']:.2f} s | {s['max']:.2f} s | {s['median'] / dask:.2f}x |"
        )
    rate = result["variables"] / len(NODES) / result["take_back_per_node"]["median"]
    rows.append(f"| variables taken back per second, one node | {rate:,.0f} | | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 small variables per node and 2 rounds")
    args = parser.parse_args()
    small, rounds = (2_000, 2) if args.quick else (20_000, 3)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(small, rounds, os.path.join(tmp, "scheduler.log"))
    print(
        f"scheduler crash and restart: {result['variables']:,} variables on {len(NODES)} simulated nodes "
        f"({result['mb']:.0f} MiB of blocks), {rounds} rounds"
    )
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
