"""Attacks on the lifecycle of ``references.carrying``, the YellowPages' wrapper of the
scheduler's update-graph handler: a scheduler crashed and restarted (new variable ids),
shutdown and a second start on the same scheduler (one wrapper, still carrying), and a
cluster of threads, where inproc comms hand a worker the scheduler's objects unpickled."""

from __future__ import annotations

import sys

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client, Event, LocalCluster

import datafabric
from datafabric.errors import NoFabricError
from datafabric.references import pin_of
from tests.conftest import local_cluster
from tests.test_attack_carried import blocks, checksum, no_scheduler_lease, open_gate, values
from tests.test_restart import NODES, insert_here, processes, worker_of  # noqa: F401  (fixture)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_view_kept_through_a_scheduler_restart_is_carried_to_a_task_after_it(processes):  # noqa: F811
    """The scheduler (its own process, preloaded) crashes and comes back on the same
    address with new variable ids; the client's view gets its lease back under the new id,
    and the references it travels as from then on name that id."""
    kept = values(15, 100_000)
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=32)
        on_a = worker_of(client)[NODES[0]]
        client.submit(insert_here, fabric, {"car/kept": kept}, workers=[on_a]).result()
        view = fabric.get("car/kept")
        declared = pin_of(view).var_id
        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)
        wait_for(lambda v=view: pin_of(v).var_id != declared, "the kept view's lease declared again", timeout=60)
        on_b = worker_of(client)[NODES[1]]  # off the view's node: the bytes are fetched
        for worker in (worker_of(client)[NODES[0]], on_b):
            assert (
                client.submit(checksum, view[3::2], workers=[worker], pure=False).result(timeout=30)[2]
                == kept[3::2].sum()
            )
        no_scheduler_lease(client)
        fabric.delete("car/kept")
        used = sum(b["used"] for b in fabric.status())
        del view
        wait_for(lambda: sum(b["used"] for b in fabric.status()) <= used - kept.nbytes, "the memory back")
        fabric.shutdown()


# -- (5) shutdown, a second start, a cluster of threads --------------------------------------
def handler_layers(dask_scheduler=None) -> int:
    handler, layers = dask_scheduler.stream_handlers["update-graph"], 0
    while getattr(handler, "carries_references", False):
        handler, layers = handler.__wrapped__, layers + 1
    return layers


def test_shutdown_and_a_second_start_leave_one_wrapper_that_still_carries():
    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        for round in range(3):
            fabric = datafabric.start(client, mb=16)
            try:
                assert client.run_on_scheduler(handler_layers) == 1
                before = blocks(fabric)
                fabric.insert("car/again", "", np.float64, values(round, 4096))
                view = fabric.get("car/again")
                assert client.submit(checksum, view[1:], pure=False).result() == (
                    "FabricView",
                    True,
                    values(round, 4096)[1:].sum(),
                )
                no_scheduler_lease(client)
                fabric.delete("car/again")
                del view
                wait_for(lambda f=fabric, b=before: blocks(f) == b, "every byte back")
            finally:
                fabric.shutdown()


def test_a_task_whose_argument_s_fabric_was_shut_down_before_it_ran_fails_and_the_worker_stays():
    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        alive = sorted(client.scheduler_info()["workers"])
        fabric.insert("car/shut", "", np.float64, values(16, 1000))
        view = fabric.get("car/shut")
        blocker = client.submit(open_gate, "car-shut-gate", pure=False)
        task = client.submit(lambda _, x: checksum(x), blocker, view[1:], pure=False)
        fabric.shutdown()  # the scheduler still holds the task, its argument a reference
        Event("car-shut-gate").set()
        with pytest.raises(NoFabricError):
            task.result(timeout=20)
        assert sorted(client.scheduler_info()["workers"]) == alive, "the worker left"
        assert client.submit(lambda: 7, pure=False).result(timeout=20) == 7
        del view, task, blocker


def test_in_a_cluster_of_threads_a_task_argument_arrives_as_a_view():
    """Inproc comms hand the scheduler's objects to a worker of the same process without
    pickling them: what the scheduler keeps is what the task gets."""
    with LocalCluster(n_workers=2, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        try:
            fabric.insert("car/threads", "", np.float64, values(13, 1000))
            view = fabric.get("car/threads")
            assert client.submit(checksum, view[2:], pure=False).result() == (
                "FabricView",
                True,
                values(13, 1000)[2:].sum(),
            )
            del view
        finally:
            fabric.shutdown()
