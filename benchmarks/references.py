"""A task on worker B that uses a 1 GiB array returned by a task on worker A, on one node:
the array a fabric view (Dask moves its reference and B maps the same pages), against a
plain numpy array (Dask moves the bytes).  Same run, same cluster, same timing.

Each repetition first computes A's result and waits for it (untimed), then times, from
the client, the submission of B's task until its result is back: the dependency's
transfer from A to B, B turning it into an array, the task touching its first and last
element.  A task on B with no dependency is timed the same way: Dask's own floor.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time

import numpy as np
from distributed import Client, LocalCluster, wait

import datafabric
from benchmarks.cluster import GiB, MiB
from benchmarks.timing import summary


def view_of(fabric: datafabric.Fabric, name: str) -> np.ndarray:
    return fabric.get(name)


def plain_array(nbytes: int) -> np.ndarray:
    return np.ones(nbytes // 8)


def touch(x: np.ndarray) -> float:
    return float(x[0] + x[-1])


def nothing() -> float:
    return 2.0


def unpickle_times(blob: bytes, calls: int) -> list[float]:
    """On B, run by ``client.run`` on its event loop as a Dask transfer would: a reference
    turned back into a view (the lease by id, over this process's private connection)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        view = pickle.loads(blob)
        times.append(time.perf_counter() - t0)
        del view
    return times


def timed(client: Client, fn, *args, worker: str) -> float:
    t0 = time.perf_counter()
    assert client.submit(fn, *args, workers=[worker], pure=False).result() == 2.0
    return time.perf_counter() - t0


def run(nbytes: int, repeat: int) -> dict:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, host="127.0.0.1")
    with cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        fabric = datafabric.start(client, mb=2 * (nbytes / MiB + 16))
        samples: dict[str, list[float]] = {"fabric": [], "dask": [], "floor": []}
        try:
            fabric.insert("bench/refs", "", np.float64, np.ones(nbytes // 8))
            for i in range(repeat + 1):  # the first round warms connections up
                on_a = client.submit(view_of, fabric, "bench/refs", workers=[a], pure=False)
                on_a.result()
                fabric_s = timed(client, touch, on_a, worker=b)
                del on_a
                on_a = client.submit(plain_array, nbytes, workers=[a], pure=False)
                wait([on_a])
                dask_s = timed(client, touch, on_a, worker=b)
                del on_a
                floor_s = timed(client, nothing, worker=b)
                if i:
                    samples["fabric"].append(fabric_s)
                    samples["dask"].append(dask_s)
                    samples["floor"].append(floor_s)
            blob = pickle.dumps(fabric.get("bench/refs"))
            samples["reference_on_loop"] = client.run(unpickle_times, blob, 50, workers=[b])[b][1:]
            samples["reference_bytes"] = [len(blob)]
        finally:
            fabric.shutdown()
    result = {k: summary(v) for k, v in samples.items()}
    result["nbytes"] = nbytes
    result["ratio"] = result["dask"]["median"] / result["fabric"]["median"]
    return result


def table(result: dict) -> str:
    rows = ["| task on B using A's result | median | min | max | unit | Dask / this |", "|---|---:|---:|---:|---|---:|"]
    dask = result["dask"]["median"]
    for key, label in (
        ("fabric", "fabric view (a reference moves)"),
        ("dask", "plain numpy array (Dask moves the bytes)"),
        ("floor", "a task on B with no dependency (Dask's floor)"),
    ):
        s = result[key]
        rows.append(
            f"| {label} | {s['median'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | {s['max'] * 1e3:.2f} | ms | {dask / s['median']:.1f}x |"
        )
    s = result["reference_on_loop"]
    rows.append(
        f"| B's event loop turning a reference back into a view (lease by id) | {s['median'] * 1e3:.2f} "
        f"| {s['min'] * 1e3:.2f} | {s['max'] * 1e3:.2f} | ms | |"
    )
    rows.append(f"| the reference, pickled | {result['reference_bytes']['median']} | | | bytes | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB, fewer repetitions")
    args = parser.parse_args()
    nbytes, repeat = (256 * MiB, 3) if args.quick else (GiB, 7)
    result = run(nbytes, repeat)
    print(f"{nbytes / MiB:.0f} MiB returned by a task on A, used by a task on B; {repeat} repetitions after 1 warm-up")
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
