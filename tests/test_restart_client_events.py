"""Clients that outlive a scheduler restart get their stream back and hear the fabric's
events again (``yp/client_events.py``, durable path): a name deleted and bound anew after
the restart is read anew, and a plain Dask client that never used the fabric keeps working."""

from __future__ import annotations

import dask
import numpy as np
from distributed import Client

import datafabric
from tests.test_restart import NODES, processes  # noqa: F401
from tests.waiting import wait_for


def test_clients_that_outlive_a_restart_hear_the_fabric_s_events_again(processes):  # noqa: F811
    with (
        dask.config.set({"datafabric.node-id": NODES[0]}),
        Client(processes.address, timeout=90) as client,
        Client(processes.address, timeout=90) as plain,
    ):
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=16)
        fabric.insert("rc/x", "", np.float64, np.full(4, 1.0))
        assert fabric.get("rc/x")[0] == 1.0
        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)
        wait_for(lambda: plain.status == "running" and client.status == "running", "both clients back", 90)
        wait_for(lambda: "rc/x" in fabric.get_list(), "the variable back", 90)
        assert fabric.get("rc/x")[0] == 1.0  # cached anew
        fabric.delete("rc/x")
        fabric.insert("rc/x", "", np.float64, np.full(8, 2.0))
        wait_for(lambda: len(fabric.get("rc/x")) == 8, "the invalidation to reach the client")
        assert plain.submit(sum, [1, 2]).result() == 3
        fabric.delete("rc/x")
        fabric.shutdown()
