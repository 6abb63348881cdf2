"""Datasets through a scheduler crash: sealed ones come back exactly, unsealed ones and
seals the crash cut short leave nothing behind.

Real processes, as ``test_restart.py`` runs them: ``dask scheduler --preload
datafabric.preload`` and one ``dask worker`` per simulated node; the scheduler is
SIGKILLed, and a new one on the same port with new workers rebuilds the directory, and
the datasets, from the blocks' headers.  A seal is cut at each of its steps by a worker
plugin that SIGKILLs the scheduler from the owner's ``mark`` handler.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import sys

import cloudpickle
import numpy as np
import pytest
from distributed import Client, Event, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric.errors import FabricError, NameNotFoundError
from datafabric.layout import ExtentState
from datafabric.names import RECORD_PART, dataset_part
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.test_restart import NODES, listed, processes, worker_of  # noqa: F401  (fixture)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write(ds, key, values):
    ds[key] = values


def create_and_write_unsealed(fabric, name):
    """A dataset whose creator (this worker) lives until the scheduler dies: it is still
    being written then."""
    ds = fabric.create_dataset(name, shape=(64, 64), chunks=(32, 32), fillvalue=7.0)
    ds[:40] = 1.0
    get_worker()._datafabric_test_unsealed = ds


def read_all(ds):
    return ds[...]


def write_grid(client, fabric, workers, name: str, data: np.ndarray) -> None:
    """Rows 0-19 written on node A, 20-29 on node B, 30-39 never (they read as the fill value)."""
    ds = fabric.create_dataset(
        name, shape=data.shape, dtype=data.dtype, chunks=(10, 8), fillvalue=-1.0, doc="a grid", attrs={"units": "K"}
    )
    client.submit(write, ds, slice(0, 20), data[:20], workers=[workers[NODES[0]]]).result()
    client.submit(write, ds, slice(20, 30), data[20:30], workers=[workers[NODES[1]]]).result()
    return ds


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def test_sealed_datasets_come_back_exactly_and_unsealed_ones_go(processes):  # noqa: F811
    rng = np.random.default_rng(11)
    grid = rng.random((40, 30))
    expected_grid = grid.copy()
    expected_grid[30:] = -1.0
    ints = np.arange(1000, dtype=np.int32).reshape(10, 100)
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        workers = worker_of(client)
        write_grid(client, fabric, workers, "grid", grid).seal()
        fabric.create_dataset("ints", data=ints, chunks=(3, 100), attrs={"n": 3, "tags": ["a", None]})  # by the client
        fabric.create_dataset("empty", shape=(5,), dtype=np.uint8, fillvalue=9).seal()  # no chunk written
        fabric.insert("plain", "", np.float64, np.ones(10))
        client.submit(create_and_write_unsealed, fabric, "unsealed", workers=[workers[NODES[1]]], pure=False).result()
        names, datasets = fabric.get_list(), fabric.datasets()
        infos = {name: fabric.info(name) for name in ("grid", "ints", "empty")}
        attrs = fabric.dataset("ints").attrs  # as the messages carry them (lists arrive as tuples)
        assert set(names) == {"grid", "ints", "empty", "plain"} and datasets == ["empty", "grid", "ints"]
        assert sum(b["reserved"] for b in fabric.status()) == 4, "the unsealed dataset's four homes"

    processes.crash_scheduler()
    processes.start()

    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        again = datafabric.connect(client)
        wait_for(lambda: listed(again) == names, f"names after restart: {listed(again)}")
        assert again.datasets() == datasets
        assert {name: again.info(name) for name in infos} == infos
        ds = again.dataset("grid")
        assert (ds.shape, ds.dtype, ds.chunks, ds.doc, ds.attrs, ds.fillvalue) == (
            (40, 30),
            np.float64,
            (10, 8),
            "a grid",
            {"units": "K"},
            -1.0,
        )
        np.testing.assert_array_equal(ds[...], expected_grid)
        np.testing.assert_array_equal(ds[3:33:4, ::-3], expected_grid[3:33:4, ::-3])
        for node in NODES:  # read where the chunks are, and where they are not
            got = client.submit(read_all, ds, workers=[worker_of(client)[node]], pure=False).result()
            np.testing.assert_array_equal(got, expected_grid)
        restored = again.dataset("ints")
        assert restored.attrs == attrs and restored.dtype == np.int32
        np.testing.assert_array_equal(restored[...], ints)
        np.testing.assert_array_equal(again.dataset("empty")[...], np.full(5, 9, np.uint8))
        with pytest.raises(NameNotFoundError):
            again.dataset("unsealed")
        # once the take-backs' waits for kept views end (yp/declarations.py)
        wait_for(lambda: all(b["reserved"] == 0 for b in again.status()), "an unsealed dataset's homes are freed")

        with pytest.raises(FabricError):  # a restored dataset is sealed: read-only as before
            restored[0] = 1
        again.create_dataset("after", data=np.ones((4, 4)))  # a new dataset beside the old ones (sealed)
        for name in again.get_list():
            again.delete(name)
        wait_for(lambda: used(again) == 0, f"space still used after deleting everything: {again.status()}")
        again.shutdown()


class KillSchedulerAtMark(WorkerPlugin):
    """SIGKILLs the scheduler when a dataset's headers are to be marked SEALED: at the
    chunks' mark (before this owner marks them), at the record's mark before it is done,
    or just after it is done (the seal's last step; its answer never leaves)."""

    name = "kill-scheduler-at-mark"

    def __init__(self, scheduler_pid: int, stage: str) -> None:
        self.scheduler_pid, self.stage = scheduler_pid, stage

    def setup(self, worker) -> None:
        original = worker.handlers["datafabric_mark"]

        def mark(**kwargs):
            parts = [dataset_part(name) for *_, name in kwargs["extents"]]
            records = [p for p in parts if p is not None and p[1] == RECORD_PART]
            chunks = [p for p in parts if p is not None and p[1] != RECORD_PART]
            if kwargs["state"] != int(ExtentState.SEALED) or not (records if self.stage != "chunks" else chunks):
                return original(**kwargs)
            if self.stage == "committed":
                original(**kwargs)
            os.kill(self.scheduler_pid, signal.SIGKILL)
            return {}

        worker.handlers["datafabric_mark"] = mark


@pytest.mark.parametrize("stage", ["chunks", "record", "committed"])
def test_a_seal_cut_short_by_a_scheduler_crash_comes_back_whole_or_not_at_all(processes, stage):  # noqa: F811
    grid = np.random.default_rng(5).random((40, 30))
    expected_grid = grid.copy()
    expected_grid[30:] = -1.0
    with Client(processes.address, timeout=90) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        ds = write_grid(client, fabric, worker_of(client), "cut", grid)
        client.register_plugin(KillSchedulerAtMark(processes.scheduler.pid, stage))
        seal = pool.submit(ds.seal)
        processes.scheduler.wait(timeout=60)  # killed by the plugin, at the stage asked for
        processes.crash_scheduler()  # its workers close
        assert isinstance(seal.exception(timeout=60), FabricError), "the seal cannot have been answered"

    processes.start()
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        again = datafabric.connect(client)
        if stage == "committed":  # the record's header said SEALED: the dataset is back, whole
            wait_for(lambda: listed(again) == ["cut"], f"names after restart: {listed(again)}")
            np.testing.assert_array_equal(again.dataset("cut")[...], expected_grid)
            again.delete("cut")
        else:  # no record: its chunks go, those marked SEALED as well as those still RESERVED
            wait_for(lambda: len(again.status()) == 2, "both nodes' blocks taken back")
        wait_for(lambda: used(again) == 0, f"the cut seal's chunks still hold memory: {again.status()}")
        assert listed(again) == [] and again.datasets() == []
        with pytest.raises(NameNotFoundError):
            again.dataset("cut")
        again.shutdown()


def hold_chunks(ds, indices, expected, event_name: str) -> int:
    """Views of chunks ``indices`` of ``ds`` in this task's process, kept until the event
    ``<name>/release`` is set; returns how many elements read wrong while held."""
    views = [ds.chunk(i) for i in indices]
    Event(f"{event_name}/held").set()
    Event(f"{event_name}/release").wait(60)
    return sum(int((v != expected[i]).sum()) for i, v in zip(indices, views, strict=True))


def count_owner_calls(dask_scheduler, start: bool) -> dict:
    """Count the YellowPages' RPCs to block owners by operation, from ``start`` on."""
    owners = dask_scheduler.plugins[SCHEDULER_PLUGIN].owners
    if not start:
        del owners.ask  # the class's own again
        return dict(owners.counted)
    owners.counted, ask = collections.Counter(), owners.ask

    async def counting(worker, op, **kwargs):
        owners.counted[op] += 1
        return await ask(worker, op, **kwargs)

    owners.ask = counting
    return {}


def test_a_sealed_datasets_delete_is_one_bulk_delete_leased_chunks_wait_and_a_restart_keeps_it_gone(
    processes,  # noqa: F811
):
    grid = np.random.default_rng(3).random((40, 30))
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        workers = worker_of(client)
        ds = write_grid(client, fabric, workers, "doomed", grid).seal()
        held = [(0, 0), (1, 3)]  # homed on node A; read there and on node B
        expected = {i: grid[10 * i[0] : 10 * i[0] + 10, 8 * i[1] : 8 * i[1] + 8] for i in held}
        holders = [
            client.submit(hold_chunks, ds, held, expected, f"doomed-{n}", workers=[workers[n]], pure=False)
            for n in NODES
        ]
        for n in NODES:
            assert Event(f"doomed-{n}/held", client=client).wait(60)
        client.run_on_scheduler(count_owner_calls, start=True)
        fabric.delete("doomed")
        calls = client.run_on_scheduler(count_owner_calls, start=False)
        # 16 chunks on both nodes: marks of the leased ones and frees of the others go in one
        # RPC per owner (and one each for the record), not one per chunk.
        assert calls.get("mark", 0) <= 3 and calls.get("free", 0) <= 3, calls
        assert fabric.datasets() == [] and "doomed" not in fabric
        with pytest.raises(NameNotFoundError):
            fabric.dataset("doomed")
        assert used(fabric) >= 2 * 10 * 8 * 8, "the held chunks' memory was freed under their views"
        for n in NODES:
            Event(f"doomed-{n}/release", client=client).set()
        assert [h.result(timeout=60) for h in holders] == [0, 0], "a view read other bytes after the delete"
        wait_for(lambda: used(fabric) == 0, f"memory still used after the last release: {fabric.status()}")

    processes.crash_scheduler()
    processes.start()
    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        again = datafabric.connect(client)
        wait_for(lambda: len(again.status()) == 2, "both nodes' blocks taken back")
        assert listed(again) == [] and again.datasets() == []
        with pytest.raises(NameNotFoundError):
            again.dataset("doomed")
        assert used(again) == 0
        again.shutdown()
