"""Attacks on write-once chunk claims (``yp/datasets.py`` ``dataset_begin_write`` with
``once=True``, the zarr store's chunk writes): of any number of racing once-writers of
a chunk exactly one writes it, whole; a claim whose home placement failed is dropped; a
chunk whose home was made stays claimed; a writer killed part-way.

Real worker processes (tasks, several threads each) and client threads racing on
overlapping chunks, each writer with its own value, checked chunk by chunk after the seal.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys

import cloudpickle
import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric import errors
from datafabric.datasets import writes
from datafabric.datasets.selection import Selection
from tests.conftest import local_cluster
from tests.waiting import wait_for

zarr = pytest.importorskip("zarr")

from zarr.core.buffer.cpu import Buffer  # noqa: E402

from datafabric.zarr import FabricStore  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")

FILL = -1.0
CHUNK = 256  # rows of 64 float64: 128 KiB a chunk


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def once_write(ds, first: int, last: int, value: float) -> str:
    """A write-once ticket of chunks ``first..last``: ``written``, or why not."""
    try:
        writes.write(ds, Selection((slice(first * CHUNK, (last + 1) * CHUNK),), ds.shape), value, once=True)
    except errors.FabricError as exc:
        return type(exc).__name__
    return "written"


def test_racing_once_writers_of_overlapping_chunks_each_chunk_has_one_writer_whole(client):
    """48 writers, from two worker processes and the client's threads, each a ticket of
    two or three neighbouring chunks of 16: every chunk is either the fill value (no
    winner touched it) or the whole value of the one winning ticket that covers it, the
    winners' chunks never overlap, and a refused ticket claimed nothing."""
    fabric = datafabric.start(client, mb=64)
    try:
        rng = np.random.default_rng(3)
        for attempt in range(3):
            ds = fabric.create_dataset(f"race{attempt}", shape=(16 * CHUNK, 64), chunks=(CHUNK, 64), fillvalue=FILL)
            tickets = []
            for k in range(48):
                first = int(rng.integers(0, 15))
                tickets.append((first, min(15, first + int(rng.integers(1, 3))), float(k + 1)))
            futures = [client.submit(once_write, ds, *t, pure=False) for t in tickets[:32]]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                here = list(pool.map(lambda t, ds=ds: once_write(ds, *t), tickets[32:]))
            outcomes = client.gather(futures) + here
            assert set(outcomes) <= {"written", "ChunkWrittenError"}, outcomes
            winners = [t for t, o in zip(tickets, outcomes, strict=True) if o == "written"]
            owner: dict[int, float] = {}
            for first, last, value in winners:
                for c in range(first, last + 1):
                    assert c not in owner, f"attempt {attempt}: chunk {c} written by {owner[c]} and {value}"
                    owner[c] = value
            # A refused ticket claimed nothing: every chunk no winner took is free to write now.
            free = [c for c in range(16) if c not in owner]
            for c in free:
                assert once_write(ds, c, c, 1000.0 + c) == "written", f"chunk {c} was left claimed by a refusal"
            ds.seal()
            got = fabric.dataset(ds.name)[...]
            for c in range(16):
                expected = owner.get(c, 1000.0 + c)
                np.testing.assert_array_equal(got[c * CHUNK : (c + 1) * CHUNK], expected, err_msg=f"chunk {c}")
            fabric.delete(ds.name)
    finally:
        fabric.shutdown()


@pytest.mark.parametrize("cover", ["part", "whole"])
def test_a_once_ticket_refused_for_want_of_space_drops_the_claims_it_placed_nothing_for(client, cover):
    """A ticket of six 4 MiB chunks with room for only some: it is refused (OutOfSpace).
    Writing ``part`` of each chunk, the chunks whose home was made stay claimed (a prefix:
    homes are placed in order, filled); the others may be written once by another writer
    once room is made.  Writing them ``whole``, the homes it made were unfilled and are
    freed with their claims (nothing was written): each chunk may be written once again.
    The dataset seals with exactly those writes, and its deletion returns every byte."""
    fabric = datafabric.start(client, mb=64)  # 2 workers: blocks of 56 and 8 MiB
    try:
        before = used(fabric)
        rows = 2048  # rows of 256 float64: 4 MiB a chunk
        fabric.insert("ballast", "", np.float64, np.zeros(40 * 2**20 // 8))
        ds = fabric.create_dataset("tight", shape=(6 * rows, 256), chunks=(rows, 256), fillvalue=FILL)

        def ticket(first: int, last: int, value: float, columns: int = 256) -> str:
            try:
                sel = Selection((slice(first * rows, (last + 1) * rows), slice(0, columns)), ds.shape)
                writes.write(ds, sel, value, once=True)
            except errors.FabricError as exc:
                return type(exc).__name__
            return "written"

        assert ticket(0, 5, 1.0, 255 if cover == "part" else 256) == "OutOfSpaceError"
        retried = [ticket(c, c, 2.0) for c in range(6)]
        if cover == "part":
            placed = retried.count("ChunkWrittenError")
            assert 0 < placed < 6 and retried == ["ChunkWrittenError"] * placed + ["OutOfSpaceError"] * (6 - placed)
        else:
            placed = retried.count("written")
            assert 0 < placed < 6 and retried == ["written"] * placed + ["OutOfSpaceError"] * (6 - placed)
        fabric.delete("ballast")
        assert [ticket(c, c, 3.0) for c in range(placed, 6)] == ["written"] * (6 - placed)
        assert [ticket(c, c, 4.0) for c in range(6)] == ["ChunkWrittenError"] * 6
        ds.seal()
        got = fabric.dataset("tight")[...]
        first = FILL if cover == "part" else 2.0  # homes made, nothing written; or written by the retry
        np.testing.assert_array_equal(got[: placed * rows], first)
        np.testing.assert_array_equal(got[placed * rows :], 3.0)
        del got
        fabric.delete("tight")
        assert used(fabric) == before
    finally:
        fabric.shutdown()


def write_zarr_chunk(fabric, index: int, value: float) -> str:
    """zarr's write of chunk ``index`` of "closing", through a store of the task's own."""
    chunk = np.full((CHUNK, 64), value).view(np.uint8).reshape(-1)
    try:
        FabricStore(fabric).set_sync(f"closing/c/{index}/0", Buffer.from_array_like(chunk))
    except errors.FabricError as exc:
        return type(exc).__name__
    return "written"


def test_a_close_racing_zarr_chunk_writes_seals_every_answered_chunk_whole_and_no_other(client):
    """Tasks write 40 chunks through zarr while the creating store closes: every write
    answered before or during the seal is in the sealed dataset whole, every other one is
    refused as the dataset being sealed (read-only) and its chunk is absent (the fill
    value); the dataset's memory is exactly its written chunks'."""
    fabric = datafabric.start(client, mb=64)
    try:
        before = used(fabric)
        store = FabricStore(fabric)
        zarr.create_array(store=store, name="closing", shape=(40 * CHUNK, 64), chunks=(CHUNK, 64), dtype="f8",
                          fill_value=FILL, compressors=None)  # fmt: skip
        futures = [client.submit(write_zarr_chunk, fabric, i, float(i + 1), pure=False) for i in range(40)]
        wait_for(lambda: sum(f.done() for f in futures) >= 4, "the first chunk writes")
        store.close()
        outcomes = client.gather(futures)
        assert set(outcomes) <= {"written", "DatasetSealedError"}, outcomes
        written = [i for i, o in enumerate(outcomes) if o == "written"]
        assert len(written) >= 4
        ds = fabric.dataset("closing")
        got = ds[...]
        for i in range(40):
            expected = float(i + 1) if i in written else FILL
            np.testing.assert_array_equal(got[i * CHUNK : (i + 1) * CHUNK], expected, err_msg=f"chunk {i}")
        assert np.flatnonzero(ds._written).tolist() == written  # exactly the answered chunks have memory
        fabric.delete("closing")
        wait_for(lambda: used(fabric) == before, "the dataset's chunks freed")
    finally:
        fabric.shutdown()


def write_chunk_dying_first(fabric, marker: str, value: float) -> float:
    """zarr's write of chunk 0 of "killed"; the first attempt (no marker yet) SIGKILLs its
    worker after copying half the chunk, as a machine losing a worker mid-task does."""
    store = FabricStore(fabric)
    if not os.path.exists(marker):
        open(marker, "w").close()
        original = writes._write_piece

        def piece(fabric, ctx, home, local, part):
            half = (slice(local[0].start, local[0].start + CHUNK // 2, 1), *local[1:])
            original(fabric, ctx, home, half, part[: CHUNK // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        writes._write_piece = piece
    store.set_sync("killed/c/0/0", Buffer.from_array_like(np.full((CHUNK, 64), value).view(np.uint8).reshape(-1)))
    return value


def test_a_zarr_chunk_writer_killed_mid_chunk_is_rerun_and_the_chunk_is_written_whole(tmp_path):
    """A task writing a chunk through zarr dies after half of it; Dask runs it again on a
    live worker.  Through zarr a chunk holds one writer's bytes, whole: the rerun must be
    able to write it (the dead writer writes nothing more), and the sealed chunk is the
    rerun's value in every element."""
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=32)
        with FabricStore(fabric) as store:
            zarr.create_array(store=store, name="killed", shape=(CHUNK, 64), chunks=(CHUNK, 64), dtype="f8",
                              fill_value=FILL, compressors=None)  # fmt: skip
            future = client.submit(write_chunk_dying_first, fabric, str(tmp_path / "died"), 7.0, pure=False)
            assert future.result(timeout=60) == 7.0
        np.testing.assert_array_equal(fabric.dataset("killed")[...], 7.0)
        fabric.shutdown()
