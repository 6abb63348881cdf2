"""Attacks on local leases and their use reports (docs "Local leases"): eviction order
driven by reads the YellowPages never saw, a replica under a local view while its node
needs room, and a worker SIGKILLed while holding a local view of a replica.

Two simulated nodes of one worker process each (with nannies), one 32 MiB block each.
"""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
import dask
import numpy as np
from distributed import get_worker

import datafabric
from tests.conftest import simulated_nodes
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
NODES = ("ll-a", "ll-b")


def node_worker(client, node: str) -> str:
    env = client.run(lambda: dask.config.get("datafabric.node-id"))
    return next(w for w, n in env.items() if n == node)


def insert_here(fabric, name: str, nbytes: int, value: float) -> None:
    fabric.insert(name, "", np.float64, np.full(nbytes // 8, value))


def read_locally(fabric, name: str) -> float:
    """A task's get: a local lease on this worker's node, no round trip."""
    from datafabric.protocol import WORKER_PLUGIN

    assert name in get_worker().plugins[WORKER_PLUGIN].local_reads.names(), f"{name} is not published here"
    return float(fabric.get(name).sum())


def hold_locally(fabric, name: str) -> float:
    view = fabric.get(name)
    get_worker()._attack_held = view
    return float(view.sum())


def checksum_of_held() -> float:
    return float(get_worker()._attack_held.sum())


def drop_held() -> None:
    del get_worker()._attack_held


def replica_nodes(fabric, name: str) -> list[str]:
    return sorted(loc[0] for loc in fabric.get_locations(name))


def test_eviction_follows_local_reads_and_spares_a_locally_held_replica_until_its_holder_dies():
    with simulated_nodes(NODES) as (_, client):
        fabric = datafabric.start(client, mb=64)
        try:
            a, b = node_worker(client, NODES[0]), node_worker(client, NODES[1])
            for i in range(3):  # e0, e1, e2 on A, replicated onto B in that order (e0 the oldest)
                client.submit(insert_here, fabric, f"e{i}", 8 * MiB, float(i), workers=[a]).result()
                fabric.replicate(f"e{i}", [NODES[1]])
            client.submit(insert_here, fabric, "a-fill", 7 * MiB, 5.0, workers=[a]).result()  # no room on A
            # e0 read on B under a local lease: only its use report tells the YellowPages
            assert client.submit(read_locally, fabric, "e0", workers=[b], pure=False).result() == 0.0
            client.submit(insert_here, fabric, "big", 12 * MiB, 9.0, workers=[b]).result()
            assert fabric.get_locations("big")[0][0] == NODES[1]
            assert replica_nodes(fabric, "e1") == [NODES[0]], "e1 was the least recently used replica on B"
            assert replica_nodes(fabric, "e0") == replica_nodes(fabric, "e2") == list(NODES)

            # A task on B holds a local view of e2's replica and reads it again: B needs room
            # again, and e0 goes, not e2
            held = client.submit(hold_locally, fabric, "e2", workers=[b], pure=False).result()
            client.submit(read_locally, fabric, "e2", workers=[b], pure=False).result()
            client.submit(insert_here, fabric, "big2", 6 * MiB, 8.0, workers=[b]).result()
            assert replica_nodes(fabric, "e0") == [NODES[0]] and replica_nodes(fabric, "e2") == list(NODES)
            assert fabric.get_locations("big2")[0][0] == NODES[1]
            assert client.submit(checksum_of_held, workers=[b], pure=False).result() == held

            # Its holder is SIGKILLed with the view: its local lease dies with it, and the
            # replica may go when B next needs room (its nanny restarts the worker)
            pid = client.run(os.getpid, workers=[b])[b]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: b not in client.scheduler_info()["workers"], "the killed worker removed")
            client.wait_for_workers(2)
            b = node_worker(client, NODES[1])
            wait_for(lambda: all(s.get("worker") for s in fabric.status()), "B's block adopted")
            client.submit(insert_here, fabric, "big3", 8 * MiB, 7.0, workers=[b]).result()
            assert replica_nodes(fabric, "e2") == [NODES[0]], "the dead worker's local lease still held e2"
            assert fabric.get_locations("big3")[0][0] == NODES[1]
            expected = {"e0": 0.0, "e1": 1.0, "e2": 2.0, "a-fill": 5.0, "big": 9.0, "big2": 8.0, "big3": 7.0}
            for name, value in expected.items():
                view = fabric.get(name)
                assert float(view.min()) == float(view.max()) == value, name
        finally:
            fabric.shutdown()
