"""``fabric.submit`` keeps working when the worker next to the data dies before the task
runs: its nanny restarts it under another address, and the task runs there."""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
import numpy as np
import psutil
from distributed import Client, Event, get_worker

import datafabric
from tests.conftest import local_cluster
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def busy_until(event_name):
    """Occupies the worker's only thread, so that the next task waits in its queue."""
    Event(event_name).wait(timeout=60)


def total_and_worker(view):
    return float(view.sum()), get_worker().address


def test_submit_runs_on_the_restarted_worker_when_the_named_one_died():
    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        try:
            fabric.insert("x", "", np.float64, np.ones(1000))
            [named] = fabric.where("x")
            client.submit(busy_until, "release-the-worker", workers=[named], pure=False)
            queued = fabric.submit(total_and_worker, "x")
            wait_for(lambda: client.processing()[named], "the tasks to reach the worker")
            pid = client.run(os.getpid)[named]
            os.kill(pid, signal.SIGKILL)
            psutil.Process(pid).wait(timeout=30)
            total, ran_on = queued.result(timeout=60)  # pinned to `named` by address, it would wait for ever
            assert total == 1000.0 and ran_on != named
            assert fabric.where("x") == [ran_on]  # the new worker adopted the block
        finally:
            Event("release-the-worker", client=client).set()
            fabric.shutdown()
