"""Reads that stay on the node: a task leases a name its node holds with no scheduler round
trip, and a free or a move still never happens under a view, however the lease was taken."""

from __future__ import annotations

import os
import sys
from collections import Counter

import cloudpickle
import numpy as np
import pytest
from distributed import Client, get_worker

import datafabric
from datafabric import errors
from tests.conftest import local_cluster
from tests.test_lifecycle import pattern, total_free, workers
from tests.waiting import kill_and_wait, results_released, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
READ_OPS = ("acquire", "acquire_many", "acquire_at", "info")


def count_reads(dask_scheduler) -> None:
    """Runs on the scheduler: count every read RPC the YellowPages serves from now on."""
    counts = dask_scheduler.__dict__.setdefault("_dfab_reads", Counter())
    counts.clear()
    for op in READ_OPS:
        key = f"datafabric_{op}"
        handler = dask_scheduler.handlers[key]
        if getattr(handler, "_dfab_counted", False):
            continue

        async def counted(*, _handler=handler, _op=op, **kwargs):
            counts[_op] += 1
            return await _handler(**kwargs)

        counted._dfab_counted = True
        dask_scheduler.handlers[key] = counted


def read_counts(dask_scheduler) -> dict:
    return dict(dask_scheduler.__dict__.get("_dfab_reads", {}))


def published_here(names) -> bool:
    """In a task: every one of ``names`` may be leased locally on this worker."""
    here = set(get_worker().plugins["datafabric"].local_reads.names())
    return set(names) <= here


def wait_published(client, worker, names) -> None:
    wait_for(lambda: client.submit(published_here, names, workers=[worker], pure=False).result(), "publication")


def held() -> dict:
    """Views a test keeps alive in a worker between tasks."""
    return get_worker().__dict__.setdefault("_dfab_held", {})


def hold(fabric, name):
    view = fabric.get(name)
    held()[name] = view
    return int(view.__array_interface__["data"][0])


def check_held(name, nbytes) -> bool:
    return bool(np.array_equal(held()[name], pattern(name, nbytes)))


def drop(name) -> None:
    held().pop(name, None)


def read_in_task(fabric, names) -> list[bool]:
    views = [fabric.get(n) for n in names[: len(names) // 2]] + fabric.get_many(names[len(names) // 2 :])
    return [bool(np.array_equal(v, pattern(n, v.nbytes))) for n, v in zip(names, views, strict=True)]


def test_a_task_s_first_get_of_a_name_its_node_holds_costs_no_scheduler_rpc(client, fabric):
    a, b = workers(client)
    names = [f"lr/{i}" for i in range(40)]
    client.submit(
        lambda f: f.insert_many([(n, "", np.uint8, pattern(n, 1000 + i)) for i, n in enumerate(names)]),
        fabric,
        workers=[a],
    ).result()
    wait_published(client, b, names)
    client.run_on_scheduler(count_reads)
    assert all(client.submit(read_in_task, fabric, names, workers=[b], pure=False).result())
    assert client.run_on_scheduler(read_counts) == {}  # not one read RPC, for 40 first gets

    views = fabric.get_many(names)  # the client: one round trip for all of them
    assert [np.array_equal(v, pattern(n, v.nbytes)) for n, v in zip(names, views, strict=True)] == [True] * 40
    assert client.run_on_scheduler(read_counts) == {"acquire_many": 1}
    assert fabric.get_many(names)[0] is not views[0] and client.run_on_scheduler(read_counts) == {"acquire_many": 1}


def test_delete_waits_for_a_view_leased_locally(client, fabric):
    a, b = workers(client)
    free = total_free(fabric)
    client.submit(lambda f: f.insert("lr/kept", "", np.uint8, pattern("lr/kept", MiB)), fabric, workers=[a]).result()
    wait_published(client, b, ["lr/kept"])
    client.run_on_scheduler(count_reads)
    client.submit(hold, fabric, "lr/kept", workers=[b], pure=False).result()
    assert client.run_on_scheduler(read_counts) == {}  # leased locally
    fabric.delete("lr/kept")
    assert "lr/kept" not in fabric.get_list()
    assert total_free(fabric) < free  # the recall reported the view: nothing was freed under it
    with pytest.raises(errors.NameNotFoundError):
        client.submit(lambda f: f.get("lr/kept"), fabric, workers=[b], pure=False).result()
    fabric.insert("lr/filler", "", np.uint8, np.full(8 * MiB, 7, np.uint8))  # lands anywhere but there
    assert client.submit(check_held, "lr/kept", MiB, workers=[b], pure=False).result()
    fabric.delete("lr/filler")
    client.submit(drop, "lr/kept", workers=[b], pure=False).result()
    wait_for(lambda: total_free(fabric) == free, "the last view's release")


def test_defragment_leaves_a_locally_leased_variable_and_moves_it_once_dropped(client, fabric):
    a, b = workers(client)
    shm_id = next(s["shm_id"] for s in fabric.status() if s["worker"] == a)
    put = lambda f, n, k: f.insert(n, "", np.uint8, pattern(n, k))  # noqa: E731
    client.submit(put, fabric, "lr/gap", MiB, workers=[a], pure=False).result()
    client.submit(put, fabric, "lr/y", 2 * MiB, workers=[a], pure=False).result()
    assert fabric.get_locations("lr/y")[0][1] == shm_id
    fabric.delete("lr/gap")
    wait_published(client, b, ["lr/y"])
    address = client.submit(hold, fabric, "lr/y", workers=[b], pure=False).result()
    assert "lr/y" not in fabric.defragment()["moved"]
    assert client.submit(check_held, "lr/y", 2 * MiB, workers=[b], pure=False).result()
    client.submit(drop, "lr/y", workers=[b], pure=False).result()
    wait_for(lambda: "lr/y" in fabric.defragment()["moved"], "the move once no view holds it")
    wait_published(client, b, ["lr/y"])  # published again at its new offset
    client.run_on_scheduler(count_reads)
    assert client.submit(hold, fabric, "lr/y", workers=[b], pure=False).result() != address
    assert client.submit(check_held, "lr/y", 2 * MiB, workers=[b], pure=False).result()
    assert client.run_on_scheduler(read_counts) == {}
    client.submit(drop, "lr/y", workers=[b], pure=False).result()
    fabric.delete("lr/y")


def test_get_many_refuses_bad_input_and_a_missing_name_keeps_no_lease(client, fabric):
    a, _ = workers(client)
    free = total_free(fabric)
    fabric.insert("lr/one", "", np.uint8, pattern("lr/one", 4096))
    with pytest.raises(errors.InvalidArgumentError, match="names must be an iterable"):
        fabric.get_many("lr/one")
    with pytest.raises(errors.InvalidArgumentError, match=r"names\[1\] must be a str"):
        fabric.get_many(["lr/one", 3])
    with pytest.raises(errors.InvalidNameError):
        fabric.get_many(["lr/one", ""])
    with pytest.raises(errors.NameNotFoundError, match="lr/none"):
        fabric.get_many(["lr/one", "lr/none"])

    def in_task(f):
        with pytest.raises(errors.NameNotFoundError):
            f.get_many(["lr/one", "lr/none"])
        return f.get_many([]) == []

    assert client.submit(in_task, fabric, workers=[a], pure=False).result()
    fabric.delete("lr/one")  # no lease is left anywhere: freed at once
    wait_for(lambda: total_free(fabric) == free, "the free")


def pid_and_hold(fabric, names) -> int:
    for name in names:
        hold(fabric, name)
    return os.getpid()


def test_a_worker_killed_holding_local_leases_frees_its_pins():
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=32)
        try:
            a, b = workers(client)
            free = total_free(fabric)
            names = ["k/unreported", "k/reported"]
            for name in names:
                client.submit(
                    lambda f, n: f.insert(n, "", np.uint8, pattern(n, MiB)), fabric, name, workers=[a]
                ).result()
            wait_published(client, b, names)
            pid = client.submit(pid_and_hold, fabric, names, workers=[b], pure=False).result()
            fabric.defragment()  # recalls both: b's two local leases become leases the YellowPages holds
            wait_published(client, b, names)
            client.submit(drop, "k/unreported", workers=[b], pure=False).result()  # released to the YellowPages
            client.submit(hold, fabric, "k/unreported", workers=[b], pure=False).result()  # local, unknown there
            results_released(client, b)
            kill_and_wait(pid)
            for name in names:
                fabric.delete(name)
            wait_for(lambda: total_free(fabric) == free, "every pin of the dead worker to be freed")
        finally:
            fabric.shutdown()
