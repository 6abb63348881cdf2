"""Attacks on sealed datasets across a scheduler restart (``yp/dataset_records.py``, docs
"Across a scheduler restart"): a delete cut by the crash right after its record went, a
client keeping a chunk's view through it, and a dataset whose record node comes back
after another node, its name taken meanwhile.

Real processes as ``test_restart_datasets.py`` runs them (``tests/processes.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sys

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric import context, layout
from datafabric.errors import FabricError, NameNotFoundError, OutOfSpaceError
from datafabric.names import RECORD_PART, dataset_part
from datafabric.protocol import HANDLER_PREFIX, WORKER_PLUGIN
from tests.test_restart import NODES, listed, pin_of, processes, worker_of  # noqa: F401  (fixture)
from tests.test_restart_datasets import write, write_grid
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS = 2048  # rows of 64 float64: 1 MiB a chunk
DECLARE_LATE = 5.0  # seconds a client takes to declare its kept views after a take-back


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


class KillSchedulerAtRecordFree(WorkerPlugin):
    """SIGKILLs the scheduler when this owner is asked to free a dataset's record: before
    freeing it, or just after (a delete cut between its record and its chunks)."""

    name = "kill-scheduler-at-record-free"

    def __init__(self, scheduler_pid: int, after: bool) -> None:
        self.scheduler_pid, self.after = scheduler_pid, after

    def setup(self, worker) -> None:
        op = f"{HANDLER_PREFIX}free"
        original = worker.handlers[op]

        def free(**kwargs):
            blocks = worker.plugins[WORKER_PLUGIN].blocks
            names = [layout.read_extent(blocks[s].segment.buf, o).name for s, o, _ in kwargs["extents"] if s in blocks]
            if not any((p := dataset_part(n)) is not None and p[1] == RECORD_PART for n in names):
                return original(**kwargs)
            if self.after:
                original(**kwargs)
            os.kill(self.scheduler_pid, signal.SIGKILL)
            return {}

        worker.handlers[op] = free


def fill_node(fabric) -> int:
    """Insert 1 MiB variables until nothing more fits (this client is on node A, so they go
    there first): any memory freed under a view is written over.  Returns how many."""
    n = 0
    while True:
        try:
            fabric.insert(f"filler/{n}", "", np.float64, np.full(ROWS * 64, -7.0))
        except OutOfSpaceError:
            return n
        n += 1


def delete_cut_by_a_crash(processes, client, fabric, name: str, after: bool) -> None:  # noqa: F811
    client.register_plugin(KillSchedulerAtRecordFree(processes.scheduler.pid, after))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(fabric.delete, name)
        processes.scheduler.wait(timeout=60)  # killed by the plugin
        processes.crash_scheduler()  # its workers close
        assert isinstance(deleting.exception(timeout=60), (FabricError, OSError)), "the delete was answered"


@pytest.mark.parametrize("after", [False, True], ids=["before-record-freed", "after-record-freed"])
def test_a_delete_cut_by_a_crash_returns_the_dataset_whole_or_nothing_of_it(processes, after):  # noqa: F811
    data = np.random.default_rng(2).random((4 * ROWS, 64))
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        workers = worker_of(client)
        ds = fabric.create_dataset("cut", shape=data.shape, chunks=(ROWS, 64), fillvalue=0.0)
        client.submit(write, ds, slice(0, 2 * ROWS), data[: 2 * ROWS], workers=[workers[NODES[0]]]).result()
        client.submit(write, ds, slice(2 * ROWS, None), data[2 * ROWS :], workers=[workers[NODES[1]]]).result()
        ds.seal()
        delete_cut_by_a_crash(processes, client, fabric, "cut", after)

    processes.start()
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        again = datafabric.connect(client)
        wait_for(lambda: len(again.status()) == 2, "both nodes' blocks taken back")
        if not after:  # the record's header still said SEALED: the delete never happened
            wait_for(lambda: listed(again) == ["cut"], f"names after restart: {listed(again)}")
            np.testing.assert_array_equal(again.dataset("cut")[...], data)
            again.delete("cut")
        wait_for(lambda: used(again) == 0, f"the cut delete's chunks still hold memory: {again.status()}")
        assert listed(again) == [] and again.datasets() == []
        with pytest.raises(NameNotFoundError):
            again.dataset("cut")
        again.shutdown()


def test_a_chunk_view_kept_through_a_delete_cut_by_a_crash_keeps_its_bytes(processes, monkeypatch, tmp_path):  # noqa: F811
    """A client on node A keeps a view of a chunk of a sealed dataset; the dataset's delete
    is cut by the crash after its record was freed.  The restarted YellowPages deletes the
    chunks (their record is gone), but the view's memory must stay the chunk's until the
    view is dropped: the docs' rule for a chunk without its record ("freed once unleased,
    a client that outlived the crash may declare a view of it").  The client declares its
    views a few seconds late (as a client reconnecting late, or slowly, does); without
    that the race between the rebuild and the declaration goes either way."""
    original = context._declare_kept_views

    async def declare_late(*args):
        await asyncio.sleep(DECLARE_LATE)
        await original(*args)

    monkeypatch.setattr(context, "_declare_kept_views", declare_late)
    log = tmp_path / "scheduler.log"
    data = np.random.default_rng(4).random((2 * ROWS, 64))
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        ds = fabric.create_dataset("viewed", shape=data.shape, chunks=(ROWS, 64), fillvalue=0.0)
        client.submit(write, ds, slice(None), data, workers=[worker_of(client)[NODES[0]]]).result()
        ds.seal()
        view = fabric.dataset("viewed").chunk((0, 0))
        assert not view.flags.owndata, "the client maps node A's block"
        lease = pin_of(view).lease
        delete_cut_by_a_crash(processes, client, fabric, "viewed", after=True)

        processes.scheduler_log = str(log)
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: len(fabric.status()) == 2, "both nodes' blocks taken back")
        wait_for(lambda: listed(fabric) == [] and fabric.datasets() == [], "the cut delete's dataset is gone")
        wait_for(lambda: "without a record" in log.read_text(), "the rebuild deleting the cut delete's chunks")
        filled = fill_node(fabric)
        np.testing.assert_array_equal(view, data[:ROWS], err_msg=f"the kept view changed ({filled} fillers)")
        assert lease["holder"] == client.id
        for n in range(filled):
            fabric.delete(f"filler/{n}")
        del view
        wait_for(lambda: used(fabric) == 0, f"memory still used: {fabric.status()}")
        fabric.shutdown()


def test_a_dataset_whose_record_node_returns_late_waits_and_loses_its_name_to_a_newer_one(processes):  # noqa: F811
    """Chunks on nodes A (with the record) and B.  Only B comes back at first: the dataset is
    listed nowhere, its name unknown, B's chunks kept (their record node is not back).  A
    new dataset takes the name.  When A returns the old dataset is complete, finds its name
    taken and is deleted whole; the new one is untouched and nothing else holds memory."""
    grid = np.random.default_rng(8).random((40, 30))
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        write_grid(client, fabric, worker_of(client), "grid", grid).seal()
    processes.crash_scheduler()

    processes.start(nodes=(NODES[1],))
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(1)
        again = datafabric.connect(client)
        wait_for(lambda: len(again.status()) == 1, "node B's block taken back")
        held = used(again)
        assert held > 0, "B's chunks are kept until their record node is back"
        assert listed(again) == [] and again.datasets() == []
        with pytest.raises(NameNotFoundError):
            again.dataset("grid")
        newer = np.arange(12.0).reshape(3, 4)
        again.create_dataset("grid", data=newer, chunks=(2, 4), doc="the newer one")
        assert used(again) > held
        newer_used = used(again) - held

        processes.start_worker(NODES[0])
        client.wait_for_workers(2)
        wait_for(lambda: len(again.status()) == 2, "node A's block taken back")
        wait_for(lambda: used(again) == newer_used, f"the old dataset still holds memory: {again.status()}")
        assert again.datasets() == ["grid"] and listed(again) == ["grid"]
        restored = again.dataset("grid")
        assert restored.doc == "the newer one"
        np.testing.assert_array_equal(restored[...], newer)
        again.delete("grid")
        wait_for(lambda: used(again) == 0, "memory still used")
        again.shutdown()


def read_all(ds):
    return ds[...]


def test_replicas_and_migrated_copies_of_chunks_come_back_as_the_dataset_whole(processes):  # noqa: F811
    """Node A's chunks are replicated onto node B by a read there, and A's block (chunks and
    record) is migrated into another block of A.  After the crash node B comes back first,
    with its own chunks and the replicas of A's: all name A as their record node, so they
    wait, the dataset unlisted.  When A is back the dataset is back whole, from either
    node; deleting it returns every byte of both."""
    grid = np.random.default_rng(12).random((40, 30))
    expected = grid.copy()
    expected[30:] = -1.0
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        workers = worker_of(client)
        ds = write_grid(client, fabric, workers, "grid", grid)
        ds.seal()
        before_read = {b["node"]: b["used"] for b in fabric.status()}
        on_b = client.submit(read_all, fabric.dataset("grid"), workers=[workers[NODES[1]]], pure=False).result()
        np.testing.assert_array_equal(on_b, expected)
        after_read = {b["node"]: b["used"] for b in fabric.status()}
        assert after_read[NODES[1]] > before_read[NODES[1]], "the read on B left replicas of A's chunks there"
        [old] = [b["shm_id"] for b in fabric.status() if b["node"] == NODES[0]]
        fabric.allocate(64)
        fabric.deallocate(NODES[0], old, migrate=True)
        assert old not in {b["shm_id"] for b in fabric.status()}
    processes.crash_scheduler()

    processes.start(nodes=(NODES[1],))
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(1)
        again = datafabric.connect(client)
        wait_for(lambda: len(again.status()) == 2, "node B's blocks taken back")
        assert used(again) == after_read[NODES[1]], "B's chunks and replicas are kept, waiting for node A"
        assert listed(again) == [] and again.datasets() == []
        processes.start_worker(NODES[0])
        client.wait_for_workers(2)
        wait_for(lambda: listed(again) == ["grid"], f"names after node A came back: {listed(again)}")
        np.testing.assert_array_equal(again.dataset("grid")[...], expected)
        for node in NODES:
            got = client.submit(read_all, again.dataset("grid"), workers=[worker_of(client)[node]], pure=False)
            np.testing.assert_array_equal(got.result(), expected)
        again.delete("grid")
        wait_for(lambda: used(again) == 0, f"memory still used: {again.status()}")
        again.shutdown()
