"""``fabric.submit`` keeps working when the worker next to the data dies before the task
runs: its nanny restarts it under another address, and the task runs there."""

from __future__ import annotations

import os
import sys

import cloudpickle
import numpy as np
from distributed import Client, Event, get_worker

import datafabric
from tests.conftest import local_cluster
from tests.waiting import kill_and_wait, wait_for

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
            kill_and_wait(pid)
            Event("release-the-worker", client=client).set()  # the busy task runs again too, pinned as it was
            total, ran_on = queued.result(timeout=60)  # pinned to `named` by address, it would wait for ever
            assert total == 1000.0 and ran_on != named
            assert fabric.where("x") == [ran_on]  # the new worker adopted the block
        finally:
            Event("release-the-worker", client=client).set()
            fabric.shutdown()


def total_here(fabric, name):
    return float(fabric.get(name).sum()), get_worker().address


def test_tasks_pinned_by_where_to_a_worker_that_died_run_on_its_node():
    """``workers=fabric.where(x)`` names addresses.  The named worker is killed with one
    such task queued behind a busy one, and another submitted after its death: both run on
    the worker its nanny starts, instead of waiting for the dead address for ever."""
    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        try:
            fabric.insert("x", "", np.float64, np.ones(1000))
            named = fabric.where("x")
            client.submit(busy_until, "release-the-busy-worker", workers=named, pure=False)
            queued = client.submit(total_here, fabric, "x", workers=named, pure=False)
            wait_for(lambda: client.processing()[named[0]], "the tasks to reach the worker")
            pid = client.run(os.getpid)[named[0]]
            kill_and_wait(pid)
            Event("release-the-busy-worker", client=client).set()  # it runs again on the new worker, first
            wait_for(lambda: named[0] not in client.scheduler_info()["workers"], "the worker's removal")
            late = client.submit(total_here, fabric, "x", workers=named, pure=False)
            for future in (queued, late):
                total, ran_on = future.result(timeout=60)
                assert total == 1000.0 and ran_on != named[0]
            assert fabric.where("x") == [ran_on]
        finally:
            Event("release-the-busy-worker", client=client).set()
            fabric.shutdown()
