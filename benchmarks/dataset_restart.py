"""What keeping datasets across a scheduler crash costs, against the same-run baseline of
plain variables holding the same bytes.

The cluster of ``benchmarks.restart`` (a preloaded scheduler, one worker on each of two
simulated nodes, separate processes).  A task on each node writes half of a dataset of
``--chunks`` chunks of 16 KiB, and inserts the same number of 16 KiB variables.

- **seal**: ``ds.seal()`` of that dataset (every chunk made a variable and marked, then
  its record written and marked), beside ``insert_many`` of as many variables from a task.
- **back**: each round SIGKILLs the scheduler, starts a new one and new workers, and times
  from that start until every plain variable is listed again, and until the dataset is
  back (its record read, every chunk known); the ratio is the dataset's time over the
  variables'.

    python -m benchmarks.dataset_restart [--chunks 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from distributed import Client

import datafabric
from benchmarks.timing import summary
from datafabric.errors import FabricError
from tests.processes import ProcessCluster

NODES = ("node-a", "node-b")
ROWS = 2048  # float64 elements: a chunk of 16 KiB


def write_half(ds, start: int, stop: int) -> None:
    ds[start * ROWS : stop * ROWS] = np.arange(start * ROWS, stop * ROWS, dtype=np.float64)


def insert_half(fabric, start: int, stop: int) -> float:
    items = [(f"plain/{i}", "", np.float64, np.full(ROWS, float(i))) for i in range(start, stop)]
    t0 = time.perf_counter()
    for first in range(0, len(items), 1000):
        fabric.insert_many(items[first : first + 1000])
    return time.perf_counter() - t0


def node_workers(client: Client) -> dict[str, str]:
    nodes = client.run(lambda: __import__("dask").config.get("datafabric.node-id"))
    return {node: worker for worker, node in nodes.items()}


def one_restart(cluster: ProcessCluster, chunks: int) -> dict:
    cluster.crash_scheduler()
    t0 = time.perf_counter()
    cluster.start()
    with Client(cluster.address, timeout=60) as client:
        fabric = datafabric.connect(client)
        variables_back = dataset_back = None
        while variables_back is None or dataset_back is None:
            try:
                listed = fabric.get_list()
            except (OSError, FabricError):  # reconnecting, or the fabric not up yet
                listed = []
            now = time.perf_counter() - t0
            if variables_back is None and sum(n.startswith("plain/") for n in listed) == chunks:
                variables_back = now
            if dataset_back is None and "ds" in listed:
                dataset_back = now
            time.sleep(0.005)
        assert float(fabric.dataset("ds")[-1]) == chunks * ROWS - 1
    return {"variables_back": variables_back, "dataset_back": dataset_back, "ratio": dataset_back / variables_back}


def run(chunks: int, rounds: int) -> dict:
    cluster = ProcessCluster(NODES)
    cluster.start()
    mb = 2 * chunks * (ROWS * 8 + 512) / 2**20 + 32
    half = chunks // 2
    try:
        with Client(cluster.address, timeout=60) as client:
            client.wait_for_workers(len(NODES))
            fabric = datafabric.start(client, mb=mb)
            workers = list(node_workers(client).values())
            ds = fabric.create_dataset("ds", shape=(chunks * ROWS,), dtype=np.float64, chunks=(ROWS,))
            bounds = [(0, half), (half, chunks)]
            client.gather(
                [client.submit(write_half, ds, a, b, workers=[w]) for w, (a, b) in zip(workers, bounds, strict=True)]
            )
            t0 = time.perf_counter()
            ds.seal()
            seal = time.perf_counter() - t0
            inserts = client.gather(
                [
                    client.submit(insert_half, fabric, a, b, workers=[w])
                    for w, (a, b) in zip(workers, bounds, strict=True)
                ]
            )
        samples = [one_restart(cluster, chunks) for _ in range(rounds)]
        with Client(cluster.address, timeout=60) as client:
            datafabric.connect(client).shutdown()
    finally:
        cluster.stop()
    result = {key: summary([s[key] for s in samples]) for key in samples[0]}
    result.update(
        chunks=chunks, rounds=rounds, seal=seal, insert_many=max(inserts), seal_vs_inserts=seal / max(inserts)
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.chunks, args.rounds)
    print(f"dataset of {args.chunks:,} chunks of 16 KiB on {len(NODES)} simulated nodes, {args.rounds} rounds")
    print(f"| seal | {result['seal']:.3f} s | insert_many of as many variables: {result['insert_many']:.3f} s |")
    for key in ("variables_back", "dataset_back", "ratio"):
        s = result[key]
        print(f"| {key} | median {s['median']:.3f} | min {s['min']:.3f} | max {s['max']:.3f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
