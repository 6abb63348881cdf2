"""Unfilled homes under attack: writers of whole chunks (homes placed without the fill
pass, ``yp/chunk_homes.py``) race writers of parts of the same chunks from several
processes on two nodes, while some whole-writers raise or are SIGKILLed half-way through
their copy.  The shared memory is first covered with a sentinel value and freed, so a home
handed out unfilled holds stale bytes that a bug would let through.

After the seal every element must be the fill value or a value some writer wrote there
(never the sentinel, never anything else); a chunk written by one whole-writer alone reads
as its value exactly if it finished, and as the fill value exactly if it raised or died;
and every byte returns once the dataset is deleted.  (A whole-writer killed along with a
killer's worker reads as the fill value or its value, whole: it may have ended its
ticket before the kill, though Dask never heard its task finish.)
"""

from __future__ import annotations

import os
import random
import signal
import sys

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
from distributed import wait
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric.datasets.writes import fill_chunks
from datafabric.errors import OutOfSpaceError
from tests.conftest import simulated_nodes
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS, COLS = 32, 512  # a chunk: 128 KiB of float64
NCHUNKS = 16
FILL = -1.0
SENTINEL = 7.25e7  # what every freed byte of the blocks holds before the dataset is written


@pytest.fixture(scope="module")
def two_nodes():
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),  # a killed writer is not run again
        simulated_nodes(("ww-a", "ww-b"), per_node=2, nthreads=2) as (_, client),
    ):
        fabric = datafabric.start(client, mb=16)
        yield client, fabric
        fabric.shutdown()


def used(fabric) -> tuple[int, int]:
    status = fabric.status()
    return sum(b["used"] for b in status), sum(b["reserved"] for b in status)


def pollute(fabric, prefix: str) -> list[str]:
    """Variables of the sentinel in the blocks of this worker's node until they are full
    (deleted by the test)."""
    names = []
    try:
        while True:
            fabric.insert(f"{prefix}/{len(names)}", "", "16384 * float64", np.full(16 * 1024, SENTINEL))
            names.append(f"{prefix}/{len(names)}")
    except OutOfSpaceError:
        return names


def write(ds, kind: str, chunk: int, box: tuple, value: float) -> None:
    """One writer: ``whole`` (``ds[chunk] = value``), ``fill`` (``fill_chunks``), ``part``
    (``ds[box] = value``), ``raise`` or ``kill`` (``fill_chunks`` failing after half)."""
    rows = slice(chunk * ROWS, (chunk + 1) * ROWS)
    if kind == "whole":
        ds[rows] = value
    elif kind == "part":
        ds[box] = value
    else:

        def fill(view, index):
            if kind == "fill":
                view[...] = value
                return
            view[: ROWS // 2] = value
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("a writer failing half-way")

        fill_chunks(ds, [(chunk, 0)], fill)


def plan(rng: random.Random) -> list[tuple[str, int, tuple, float]]:
    """Chunks 0-3 have one writer each (whole, fill, raise, kill: checked exactly); the
    others 1-4 writers of random kinds, parts at random places."""
    writers = [("whole", 0), ("fill", 1), ("raise", 2), ("kill", 3)]
    for chunk in range(4, NCHUNKS):
        writers += [
            (rng.choice(["whole", "fill", "part", "part", "raise", "kill"]), chunk) for _ in range(rng.randint(1, 4))
        ]
    kills = [i for i, (kind, _) in enumerate(writers) if kind == "kill"]
    for i in kills[3:]:  # at most three restarts a round
        writers[i] = ("raise", writers[i][1])
    out = []
    for n, (kind, chunk) in enumerate(writers):
        r0, c0 = rng.randrange(ROWS), rng.randrange(COLS)
        box = (slice(chunk * ROWS + r0, chunk * ROWS + rng.randint(r0 + 1, ROWS)), slice(c0, rng.randint(c0 + 1, COLS)))
        out.append((kind, chunk, box, float(n + 1)))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_whole_writers_racing_part_writers_and_dying_leave_only_fill_or_written_values(two_nodes, seed):
    client, fabric = two_nodes
    before = used(fabric)
    workers = sorted(client.scheduler_info()["workers"])
    polluted = client.gather(
        [client.submit(pollute, fabric, f"sentinel/{seed}/{w}", workers=[w], pure=False) for w in workers]
    )
    fabric.delete_many([n for names in polluted for n in names])

    rng = random.Random(seed)
    writers = plan(rng)
    name = f"whole-writes/{seed}"
    ds = fabric.create_dataset(name, shape=(NCHUNKS * ROWS, COLS), chunks=(ROWS, COLS), fillvalue=FILL)
    futures = [
        client.submit(write, ds, kind, chunk, box, value, workers=[rng.choice(workers)], pure=False)
        for kind, chunk, box, value in writers
    ]
    wait(futures)
    client.wait_for_workers(len(workers))  # the nannies' new workers
    wait_for(lambda: not any(b.get("orphaned") for b in fabric.status()), "the new workers to adopt the blocks")
    finished = [f.status == "finished" for f in futures]
    ds.seal()

    got = fabric.dataset(name)[...]
    allowed = [{FILL} for _ in range(NCHUNKS)]
    for _, chunk, _, value in writers:
        allowed[chunk].add(value)
    for chunk in range(NCHUNKS):
        rows = got[chunk * ROWS : (chunk + 1) * ROWS]
        stray = ~np.isin(rows, sorted(allowed[chunk]))
        assert not stray.any(), f"chunk {chunk} holds {np.unique(rows[stray])[:5]}: neither fill nor written"
    for kind, _, box, value in writers:  # a part-writer's value only where it wrote
        if kind == "part":
            outside = np.ones((NCHUNKS * ROWS, COLS), bool)
            outside[box] = False
            assert not (got[outside] == value).any(), f"a part-writer's value {value} outside its box"
    for i, (kind, chunk, _, value) in enumerate(writers[:4]):  # one writer each
        rows = got[chunk * ROWS : (chunk + 1) * ROWS]
        if kind in ("raise", "kill"):
            expected = FILL
        elif finished[i]:
            expected = value
        else:  # killed with another task's worker: before its end (fill) or after (its value)
            expected = rows.flat[0]
            assert expected in (FILL, value), f"chunk {chunk} ({kind}) begins with {expected}"
        np.testing.assert_array_equal(rows, expected, err_msg=f"chunk {chunk} ({kind}): whole, or not at all")

    fabric.delete(name)
    wait_for(lambda: used(fabric) == before, f"the dataset's memory to return: {fabric.status()}")


def test_a_batch_ticket_keeps_the_chunks_filled_before_a_failure_and_frees_the_rest(two_nodes):
    """``fill_chunks`` of three chunks in one ticket, failing half-way through the second:
    the first was confirmed complete and stays; the second (half-written) and the third
    (never begun) read as the fill value; nothing else is held."""
    _, fabric = two_nodes
    before = used(fabric)
    ds = fabric.create_dataset("whole-writes/batch", shape=(4 * ROWS, COLS), chunks=(ROWS, COLS), fillvalue=FILL)

    def fill(view, index):
        view[: ROWS // 2] = index[0] + 1
        if index[0] == 1:
            raise RuntimeError("a read error half-way")
        view[ROWS // 2 :] = index[0] + 1

    with pytest.raises(RuntimeError, match="half-way"):
        fill_chunks(ds, [(0, 0), (1, 0), (2, 0)], fill)
    ds.seal()
    expected = np.full((4 * ROWS, COLS), FILL)
    expected[:ROWS] = 1
    np.testing.assert_array_equal(fabric.dataset("whole-writes/batch")[...], expected)
    assert fabric.info("whole-writes/batch")["dataset"]["written"] == 1
    fabric.delete("whole-writes/batch")
    wait_for(lambda: used(fabric) == before, f"the dataset's memory to return: {fabric.status()}")


class CountFills(WorkerPlugin):
    """Counts the fill passes (``fill_extent``) each worker runs for chunk homes."""

    name = "count-fills"

    def setup(self, worker) -> None:
        self.original = original = worker.handlers["datafabric_fill_extent"]
        worker.fills = 0

        def fill_extent(**kwargs):
            worker.fills += 1
            return original(**kwargs)

        worker.handlers["datafabric_fill_extent"] = fill_extent

    def teardown(self, worker) -> None:
        worker.handlers["datafabric_fill_extent"] = self.original


def fills(client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.fills).values())


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
def test_whole_chunk_writers_skip_the_fill_pass_and_part_writers_do_not(two_nodes):
    """``from_dask``'s chunk tasks, ``fill_chunks`` (imports) and zarr's chunk writes get
    their homes unfilled; a write of part of a chunk gets a filled home.  The bytes read
    back exactly either way."""
    zarr = pytest.importorskip("zarr")
    from datafabric.zarr import FabricStore

    client, fabric = two_nodes
    client.register_plugin(CountFills())
    try:
        x = da.random.default_rng(5).random((8 * ROWS, COLS), chunks=(ROWS, COLS))
        ds = fabric.from_dask("fills/dask", x)
        np.testing.assert_array_equal(ds[...], x.compute())
        imported = fabric.create_dataset("fills/import", shape=(2 * ROWS, COLS), chunks=(ROWS, COLS))
        fill_chunks(imported, [(0, 0), (1, 0)], lambda view, index: view.fill(index[0] + 1))
        imported.seal()
        with FabricStore(fabric) as store:
            z = zarr.create_array(store=store, name="fills/zarr", shape=(ROWS, COLS), chunks=(ROWS, COLS),
                                  dtype="f8", compressors=None)  # fmt: skip
            z[...] = 3.0
        assert fills(client) == 0, "a chunk written whole was filled first"
        with fabric.create_dataset("fills/part", shape=(ROWS, COLS), chunks=(ROWS, COLS), fillvalue=FILL) as part:
            part[1:, :] = 4.0
        assert fills(client) == 1, "a chunk written in part was not filled"
        np.testing.assert_array_equal(fabric.dataset("fills/import")[ROWS:], 2.0)
        np.testing.assert_array_equal(fabric.dataset("fills/zarr")[...], 3.0)
        assert (fabric.dataset("fills/part")[0] == FILL).all() and (fabric.dataset("fills/part")[1:] == 4.0).all()
    finally:
        client.unregister_worker_plugin(CountFills.name)
        fabric.delete_many(["fills/dask", "fills/import", "fills/zarr", "fills/part"])
