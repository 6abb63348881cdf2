"""Attacks on a seal's step from homes to chunks in columns (``yp/chunk_columns.py``,
``Datasets.seal``): between ``seal_chunks`` and the dataset's visibility the chunks are known
by name and their headers still say RESERVED.  The seal is slowed on the scheduler (its
chunks' marks, or its record's write) so that gets, defragments and the dataset's delete
land in that window every time.  The method is ``test_attack_columns.py``'s.
"""

from __future__ import annotations

import concurrent.futures
import sys

import cloudpickle
import numpy as np
import pytest

from datafabric import layout
from datafabric.errors import FabricError, NameNotFoundError
from datafabric.names import chunk_name
from datafabric.shm import Segment
from tests.columns import (
    CHUNK,
    N,
    checked,
    data,
    expected,
    fill,
    in_columns_of,
    settled,
    slow,
    used,
)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("component,method", [("owners", "mark_chunks"), ("datasets.records", "write")])
def test_a_dataset_deleted_mid_seal_while_its_chunks_are_read_by_name_and_walked(client, fabric, component, method):
    """Between the seal's columns and its end the chunks are known by name: a get of one
    materialises it, a defragment's walk of their block the others, the delete ends the
    seal; the view keeps its bytes and every byte comes back."""
    base = used(fabric)
    fabric.insert("cols/gap", "", np.uint8, np.ones(2**18, np.uint8))
    ds = fabric.create_dataset("cols/sealing", shape=(N * CHUNK,), dtype=np.float64, chunks=CHUNK)
    ds[...] = data(10)
    fabric.delete("cols/gap")
    client.run_on_scheduler(slow, component=component, method=method, seconds=2.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sealing = pool.submit(ds.seal)
            wait_for(lambda: client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N, "the seal mid-way")
            view = fabric.get(chunk_name(ds.id, 3))  # known by name before the dataset is visible
            assert ds.name not in fabric.datasets()
            fabric.defragment()
            checked(client)
            fabric.delete(ds.name)
            with pytest.raises(FabricError):
                sealing.result(timeout=60)
    finally:
        client.run_on_scheduler(slow, component=component, method=method, seconds=0)
    assert ds.name not in fabric.datasets() and ds.name not in fabric.get_list()
    with pytest.raises(NameNotFoundError):
        fabric.get(chunk_name(ds.id, 4))
    assert fill(fabric, "cols/filler")
    np.testing.assert_array_equal(view, expected(10, 3))
    fabric.delete_prefix("cols/filler")
    del view
    settled(client, fabric, base)
    assert checked(client)["in_columns"] == 0


def headers(shm_ids: set[str]) -> dict[str, list[tuple[int, int]]]:
    """Name -> (state, data offset) of every extent the blocks' headers show."""
    found: dict[str, list[tuple[int, int]]] = {}
    for shm_id in shm_ids:
        seg = Segment.attach(shm_id)
        try:
            for e in layout.walk(seg.buf):
                found.setdefault(e.name, []).append((int(e.state), e.data_offset))
        finally:
            seg.close()
    return found


def test_chunks_materialised_mid_seal_are_sealed_where_the_directory_says(client, fabric):
    """A seal paused in its chunks' marks while a get materialises one and a defragment
    materialises the rest (moving none: their headers still say RESERVED): once it ends and
    a defragment moves them, each chunk's header says SEALED exactly once, at the offset
    the directory gives, as a restart would read it."""
    base = used(fabric)
    fabric.insert("cols/gap", "", np.uint8, np.ones(2**18, np.uint8))
    ds = fabric.create_dataset("cols/marked", shape=(N * CHUNK,), dtype=np.float64, chunks=CHUNK)
    ds[...] = data(21)
    fabric.delete("cols/gap")
    client.run_on_scheduler(slow, component="owners", method="mark_chunks", seconds=2.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sealing = pool.submit(ds.seal)
            wait_for(lambda: client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N, "the seal mid-way")
            view = fabric.get(chunk_name(ds.id, 3))
            assert not fabric.defragment()["moved"], "RESERVED headers: the owner moves none"
            assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == 0, "the compaction's walk"
            sealing.result(timeout=60)
    finally:
        client.run_on_scheduler(slow, component="owners", method="mark_chunks", seconds=0)
    moved = set(fabric.defragment()["moved"])  # SEALED now: those before the leased one slide into the hole
    assert moved == {chunk_name(ds.id, f) for f in (0, 1, 2)}, moved
    where = {chunk_name(ds.id, f): fabric.get_locations(chunk_name(ds.id, f)) for f in range(N)}
    shown = headers({loc[1] for locs in where.values() for loc in locs})
    for name, [(_, _, data_offset)] in where.items():
        assert shown[name] == [(int(layout.ExtentState.SEALED), data_offset)], (name, shown[name], data_offset)
    np.testing.assert_array_equal(view, expected(21, 3))
    np.testing.assert_array_equal(fabric.dataset(ds.name)[...], data(21))
    checked(client)
    del view
    fabric.delete(ds.name)
    settled(client, fabric, base)
