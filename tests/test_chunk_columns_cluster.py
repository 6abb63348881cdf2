"""A sealed dataset's chunks in columns on a real cluster: tasks read them under local
leases and they stay in columns; a view held under such a lease keeps its bytes through
a defragment and through the dataset's delete, and the memory returns once it is
dropped; a read under a global lease materialises just the chunk it reads."""

from __future__ import annotations

import sys

import cloudpickle
import numpy as np
from distributed import get_worker

from datafabric.names import chunk_name
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.test_lifecycle import total_free, workers
from tests.test_local_reads import count_reads, read_counts, wait_published
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHUNK = 4096  # float64 elements a chunk
N = 24


def in_columns(dask_scheduler, dataset_id: int) -> int:
    """Runs on the scheduler: how many of the dataset's chunks are still in columns."""
    columns = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory.columns.by_dataset.get(dataset_id)
    return 0 if columns is None else columns.left


def values(n: int = N) -> np.ndarray:
    return np.arange(n * CHUNK, dtype=np.float64) * 3 + 1


def hold_chunks(ds, flats: list[int]) -> list[int]:
    """In a task: views of chunks kept in the worker between tasks; their addresses."""
    kept = get_worker().__dict__.setdefault("_dfab_chunks", {})
    for f in flats:
        kept[f] = ds.chunk(f)
    return [int(kept[f].__array_interface__["data"][0]) for f in flats]


def check_chunks(flats: list[int]) -> bool:
    kept = get_worker().__dict__["_dfab_chunks"]
    expected = values()
    return all(np.array_equal(kept[f], expected[f * CHUNK : (f + 1) * CHUNK]) for f in flats)


def drop_chunks() -> None:
    get_worker().__dict__.pop("_dfab_chunks", None)


def _sealed_and_held(client, fabric, name: str, held: list[int]):
    """A dataset sealed after a hole was made before it, ``held`` chunks' views kept in
    worker b under local leases, every chunk still in columns."""
    _, b = workers(client)
    fabric.insert(f"{name}-gap", "", np.uint8, np.ones(2**20, np.uint8))
    ds = fabric.create_dataset(name, data=values(), chunks=CHUNK)
    fabric.delete(f"{name}-gap")  # a hole a defragment may move chunks into
    wait_published(client, b, [chunk_name(ds.id, f) for f in range(N)])
    client.run_on_scheduler(count_reads)
    total = client.submit(lambda d: float(d.to_dask().sum().compute(scheduler="sync")), ds, workers=[b]).result()
    assert total == values().sum()
    client.submit(hold_chunks, ds, held, workers=[b], pure=False).result()
    assert client.run_on_scheduler(read_counts) == {}  # every read a local lease
    assert client.run_on_scheduler(in_columns, dataset_id=ds.id) == N  # and none built a variable
    return ds, b


def test_views_of_chunks_in_columns_keep_their_bytes_through_the_datasets_delete(client, fabric):
    free = total_free(fabric)
    held = [0, 5, N - 1]
    ds, b = _sealed_and_held(client, fabric, "cols/deleted", held)
    fabric.delete("cols/deleted")  # its chunks materialised and recalled: the views' leases become known
    assert "cols/deleted" not in fabric.datasets() and total_free(fabric) < free  # the held chunks' memory stays
    assert client.submit(check_chunks, held, workers=[b], pure=False).result()
    client.submit(drop_chunks, workers=[b], pure=False).result()
    wait_for(lambda: total_free(fabric) == free, "the held chunks' memory once their views are dropped")


def test_views_of_chunks_in_columns_are_never_moved_by_a_defragment(client, fabric):
    free = total_free(fabric)
    held = list(range(N))
    ds, b = _sealed_and_held(client, fabric, "cols/moved", held)
    moved = fabric.defragment()["moved"]
    assert not {chunk_name(ds.id, f) for f in held} & set(moved)
    assert client.submit(check_chunks, held, workers=[b], pure=False).result()
    client.submit(drop_chunks, workers=[b], pure=False).result()
    np.testing.assert_array_equal(fabric.dataset("cols/moved")[...], values())
    fabric.delete("cols/moved")
    wait_for(lambda: total_free(fabric) == free, "the dataset's memory")


def test_a_read_under_a_global_lease_materialises_only_the_chunk_it_reads(client, fabric):
    ds = fabric.create_dataset("cols/global", data=values(), chunks=CHUNK)
    try:
        view = ds.chunk(3)  # the client: a global lease
        np.testing.assert_array_equal(view, values()[3 * CHUNK : 4 * CHUNK])
        assert client.run_on_scheduler(in_columns, dataset_id=ds.id) == N - 1
        del view
    finally:
        fabric.delete("cols/global")
