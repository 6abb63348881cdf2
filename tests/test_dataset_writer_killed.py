"""A dataset's writer SIGKILLed at each stage of its write: while its chunks' homes are
being placed (and filled), in the middle of copying its bytes, and after the copy before
its write ticket ends.  The dataset then seals (or is aborted) cleanly, what the other
writer wrote reads back exactly, and every byte of memory returns once the dataset is
deleted.  What the dead writer wrote: a writer of part of each chunk (filled homes)
leaves its bytes as far as it got, each element its value or the fill value; a writer of
whole chunks (homes placed unfilled, ``yp/chunk_homes.py``) never confirmed them
complete, so its chunks were freed and read as the fill value: never half-written, never
an earlier variable's bytes.

Two simulated nodes of two worker processes each (with nannies, which restart the
killed worker under a new address).  The writer killed is a worker of node A, which
homes its chunks on node A and writes them through its own mapping; a block owner may
die with it, and its peer adopts the block with the homes in it.
"""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client, KilledWorker, Nanny, Scheduler, SpecCluster, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric import layout
from datafabric.names import dataset_part
from datafabric.protocol import WORKER_PLUGIN
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODES = ("wk-a", "wk-b")
FILL = -1.0


@pytest.fixture(scope="module")
def two_nodes():
    workers = {
        f"{node}-{i}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "host": "127.0.0.1", "env": {"DASK_DATAFABRIC__NODE_ID": node}},
        }
        for node in NODES
        for i in range(2)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),  # a killed writer's task is not run again
        SpecCluster(workers=workers, scheduler=scheduler) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(4)
        fabric = datafabric.start(client, mb=4 * 32)
        yield client, fabric
        fabric.shutdown()


def node_workers(client) -> dict[str, list[str]]:
    env = client.run(lambda: dask.config.get("datafabric.node-id"))
    return {node: sorted(w for w, n in env.items() if n == node) for node in NODES}


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def write(ds, key, values):
    ds[key] = values


def write_and_die(ds, key, values, victim: str, stage: str):
    """``ds[key] = values``; on the victim, killed part-way (``mid-copy``: the first chunk
    written, half the rows of the second; ``written``: every byte copied, before the
    ticket ends)."""
    from datafabric.datasets import writes

    if get_worker().address == victim and stage in ("mid-copy", "written"):
        original, pieces = writes._write_piece, []

        def piece(fabric, ctx, home, local, part):
            pieces.append(home["flat"])
            if stage == "mid-copy" and len(pieces) == 2:
                rows = local[0]
                original(fabric, ctx, home, (slice(rows.start, rows.start + 5, 1), *local[1:]), part[:5])
                os.kill(os.getpid(), signal.SIGKILL)
            original(fabric, ctx, home, local, part)
            if stage == "written" and len(pieces) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        writes._write_piece = piece
    ds[key] = values


class KillAtPlacing(WorkerPlugin):
    """Kills the victim when a home of the dataset is being placed (on whichever owner
    places it, the victim itself included): a part-writer's home when it is filled, a
    whole-writer's (never filled) when it is reserved.  Its ticket is then in flight with
    a placement."""

    name = "kill-writer-at-placing"

    def __init__(self, dataset_id: int, victim_pid: int, handler: str) -> None:
        self.dataset_id, self.victim_pid, self.handler = dataset_id, victim_pid, f"datafabric_{handler}"

    def setup(self, worker) -> None:
        self.worker = worker
        self.original = original = worker.handlers[self.handler]

        def chunk_name(kwargs) -> str:
            if "name" in kwargs:  # reserve
                return kwargs["name"]
            buf = worker.plugins[WORKER_PLUGIN].blocks[kwargs["shm_id"]].segment.buf
            return layout.read_extent(buf, kwargs["extent_offset"]).name

        def handler(**kwargs):
            part = dataset_part(chunk_name(kwargs))
            if part is not None and part[0] == self.dataset_id:
                try:
                    os.kill(self.victim_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # dead already: a later placement
            return original(**kwargs)

        worker.handlers[self.handler] = handler

    def teardown(self, worker) -> None:
        worker.handlers[self.handler] = self.original


@pytest.mark.parametrize("cover", ["part", "whole"])
@pytest.mark.parametrize(
    "stage, end",
    [("placing", "seal"), ("placing", "abort"), ("mid-copy", "seal"), ("written", "seal"), ("mid-copy", "rerun")],
)
def test_a_writer_killed_mid_write_leaves_a_dataset_that_seals_or_aborts_cleanly(two_nodes, stage, end, cover):
    """``cover``: the victim writes 39 of each chunk's 40 columns, or its chunks whole."""
    client, fabric = two_nodes
    rng = np.random.default_rng(len(stage) + len(end))
    a_rows, b_rows = rng.random((20, 40)), rng.random((20, 40))
    cols = 39 if cover == "part" else 40
    before = used(fabric)
    per_node = node_workers(client)
    victim, other_b = per_node[NODES[0]][0], per_node[NODES[1]][0]
    pids = client.run(os.getpid)

    name = f"killed/{stage}-{end}-{cover}"
    ds = fabric.create_dataset(name, shape=(40, 40), chunks=(10, 40), fillvalue=FILL)  # 4 chunks of 10 rows
    client.submit(write, ds, slice(20, 40), b_rows, workers=[other_b]).result()  # the writer that lives
    if stage == "placing":
        client.register_plugin(KillAtPlacing(ds.id, pids[victim], "fill_extent" if cover == "part" else "reserve"))
    key = (slice(0, 20), slice(0, cols))
    task = client.submit(write_and_die, ds, key, a_rows[:, :cols], victim, stage, workers=[victim])
    with pytest.raises(KilledWorker):
        task.result(timeout=120)
    if stage == "placing":
        client.unregister_worker_plugin(KillAtPlacing.name)
    client.wait_for_workers(4)  # the nanny's new worker
    if end == "rerun":  # what Dask does with allowed failures left: the region written again, elsewhere
        client.submit(write, ds, key, a_rows[:, :cols], workers=node_workers(client)[NODES[0]]).result()

    if end == "abort":
        ds.abort()
        assert name not in fabric.get_list() and name not in fabric.datasets()
    else:
        ds.seal()
        got = fabric.dataset(name)[...]
        np.testing.assert_array_equal(got[20:], b_rows, err_msg="the other writer's chunks")
        expected = np.full((20, 40), FILL)
        if end == "rerun":
            expected[:, :cols] = a_rows[:, :cols]
        elif cover == "whole":
            pass  # never confirmed complete: its homes were freed, the chunks read as the fill value
        elif stage == "written":
            expected[:, :cols] = a_rows[:, :cols]
        elif stage == "mid-copy":
            expected[:15, :cols] = a_rows[:15, :cols]  # the first chunk whole, half of the second
        np.testing.assert_array_equal(got[:20], expected, err_msg="the killed writer's chunks")
        fabric.delete(name)
    wait_for(
        lambda: used(fabric) == before and all(b["reserved"] == 0 for b in fabric.status()),
        f"the dataset's memory to return: {fabric.status()}",
    )


def zarr_write(fabric, name, rows, values, victim: str | None = None, stage: str = ""):
    """``z[rows] = values`` through zarr over a ``FabricStore`` (one chunk: a write-once
    ticket of the whole chunk); on the victim, killed half-way through the copy
    (``mid-copy``) or after it, before the ticket ends (``written``)."""
    import zarr

    from datafabric.datasets import writes
    from datafabric.zarr import FabricStore

    if get_worker().address == victim:
        original = writes._write_piece

        def piece(fabric, ctx, home, local, part):
            if stage == "mid-copy":
                original(fabric, ctx, home, (slice(0, 5, 1), *local[1:]), part[:5])
                os.kill(os.getpid(), signal.SIGKILL)
            original(fabric, ctx, home, local, part)
            os.kill(os.getpid(), signal.SIGKILL)

        writes._write_piece = piece
    z = zarr.open_array(store=FabricStore(fabric), path=name, mode="r+")
    z[rows] = values


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
@pytest.mark.parametrize(
    "stage, end", [("mid-copy", "seal"), ("written", "seal"), ("mid-copy", "abort"), ("written", "rerun")]
)
def test_a_zarr_writer_killed_mid_chunk_leaves_no_part_of_it(two_nodes, stage, end):
    """A task writing a chunk through zarr into ``FabricStore``, SIGKILLed part-way: the
    chunk's home was placed unfilled for it and never confirmed, so its writer's departure
    fills it (a departed process may be alive and still copying into it, so it is kept,
    not freed): the chunk reads as the fill value, never half-written; it may be written
    again (the write-once claim went with it); the dataset seals or aborts cleanly; memory
    returns."""
    zarr = pytest.importorskip("zarr")
    from datafabric.zarr import FabricStore

    client, fabric = two_nodes
    before = used(fabric)
    per_node = node_workers(client)
    victim, other_b = per_node[NODES[0]][0], per_node[NODES[1]][0]
    rng = np.random.default_rng(len(stage) + len(end))
    a_rows, b_rows = rng.random((10, 40)), rng.random((10, 40))
    name = f"zkilled/{stage}-{end}"
    store = FabricStore(fabric)
    zarr.create_array(store=store, name=name, shape=(20, 40), chunks=(10, 40), dtype="f8", fill_value=FILL,
                      compressors=None)  # fmt: skip
    client.submit(zarr_write, fabric, name, slice(10, 20), b_rows, workers=[other_b]).result()
    task = client.submit(zarr_write, fabric, name, slice(0, 10), a_rows, victim, stage, workers=[victim])
    with pytest.raises(KilledWorker):
        task.result(timeout=120)
    client.wait_for_workers(4)
    if end == "rerun":
        client.submit(zarr_write, fabric, name, slice(0, 10), a_rows, workers=[other_b]).result()
    if end == "abort":
        fabric.dataset(name).abort()
        assert name not in fabric.datasets()
    else:
        store.close()  # seals what this store created
        expected = np.full((20, 40), FILL)
        expected[10:] = b_rows
        if end == "rerun":
            expected[:10] = a_rows
        else:
            # The filled home, kept if the writer's departure was settled before the seal;
            # sealed before it, the chunk was never confirmed and is absent.  Either way it
            # reads as the fill value, never half-written.
            kept = FabricStore(fabric).get_sync(f"{name}/c/0/0")
            assert kept is None or (np.frombuffer(kept.to_bytes(), "f8") == FILL).all()
            del kept  # its view holds the chunk's lease
        np.testing.assert_array_equal(zarr.open_array(store=FabricStore(fabric), path=name, mode="r")[:], expected)
        fabric.delete(name)
    wait_for(
        lambda: used(fabric) == before and all(b["reserved"] == 0 for b in fabric.status()),
        f"the dataset's memory to return: {fabric.status()}",
    )
