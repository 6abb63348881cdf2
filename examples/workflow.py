"""The design's workflow, end to end: tasks store typed arrays in the fabric, other worker
processes read them back zero-copy, and the client looks at what is stored.

Run inside a fabric started by ``datafabric start --run examples/workflow.py`` (it finds
the cluster through DASK_SCHEDULER_ADDRESS), or alone: it then starts its own local
cluster of worker processes and a fabric in it.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from distributed import Client, LocalCluster, get_worker
from ndtypes import ndt

import datafabric


def simulate(fabric: datafabric.Fabric, step: int) -> list:
    """A producer task: computes a field and stores it once, typed, for every process."""
    field = np.fromfunction(lambda i, j: np.sin(i / 7 + step) * np.cos(j / 5), (40, 20))
    return fabric.insert(f"run1/temps/{step}", f"temperature field, step {step}", ndt("40 * 20 * float64"), field)


def consume(fabric: datafabric.Fabric, name: str) -> dict:
    """A consumer task on another worker: a read-only view onto the same memory."""
    view = fabric.get(name)
    return {
        "worker": get_worker().address,
        "pid": os.getpid(),
        "mean": float(view.mean()),
        "zero_copy": not view.flags.owndata and not view.flags.writeable,
    }


@contextlib.contextmanager
def fabric_session():
    if os.environ.get("DASK_SCHEDULER_ADDRESS"):
        with Client() as client:
            yield client, datafabric.connect(client)
        return
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        fabric = datafabric.start(client, mb=256)
        try:
            yield client, fabric
        finally:
            fabric.shutdown()


def main() -> None:
    with fabric_session() as (client, fabric):
        producer, consumer = sorted(client.scheduler_info()["workers"])[:2]
        print(f"fabric {fabric.fabric_id[:8]} on {client.scheduler.address}")
        futures = [client.submit(simulate, fabric, step, workers=[producer], pure=False) for step in range(3)]
        for step, locations in enumerate(client.gather(futures)):
            print(f"step {step}: stored by {producer} at {locations}")

        print("names:", fabric.get_list(prefix="run1/"))
        name = "run1/temps/2"
        print("info:", fabric.info(name))
        result = client.submit(consume, fabric, name, workers=[consumer]).result()
        print(
            f"read on {result['worker']} (pid {result['pid']}): mean {result['mean']:.6f}, zero-copy {result['zero_copy']}"
        )

        here = fabric.get(name)  # the client shares the machine: a view, no copy
        print(f"read in the client (pid {os.getpid()}): shape {here.shape}, mean {here.mean():.6f}")
        for step in range(3):
            fabric.delete(f"run1/temps/{step}")
        del here


if __name__ == "__main__":
    main()
