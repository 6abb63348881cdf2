"""Attacks on sealed datasets' chunks kept in columns (``yp/chunk_columns.py``), on one node.

The promise: a chunk in columns is a variable in its plainest state, materialised in one
step by any protocol that needs more, and never recorded twice.  Each test drives the
session's worker processes over real shared memory, seeded, runs ``tests.columns.audit``
on the scheduler after every step, checks views against their expected bytes while they
live (the memory freed under them overwritten), and ends with the owners' ``status()``
figures back where they started.  Two nodes, closing workers, a scheduler restart and
references are in ``test_attack_columns_nodes.py``; the seal's own window in
``test_attack_columns_seal.py``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections import Counter

import cloudpickle
import numpy as np
import psutil
import pytest
from distributed import Client, Event, Queue
from distributed.diagnostics.plugin import WorkerPlugin

import datafabric
from datafabric.errors import BlockInUseError, InvalidNameError, NameNotFoundError
from datafabric.names import CHUNK_PREFIX, chunk_name
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.columns import (
    CHUNK,
    N,
    blocks_of,
    checked,
    data,
    drop_everywhere,
    expected,
    fill,
    hold,
    hold_in,
    in_columns_of,
    settled,
    used,
    views_intact,
)
from tests.conftest import local_cluster
from tests.http_helpers import api, http_port
from tests.test_lifecycle import workers
from tests.test_local_reads import wait_published
from tests.waiting import results_released

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- one node: readers, defragments, deletes -----------------------------------------------
def test_readers_of_two_datasets_sharing_blocks_through_defragments_and_a_delete(client, fabric):
    rng = np.random.default_rng(7)
    a, b = workers(client)
    where = [a, b]
    base = used(fabric)
    settled(client, fabric, base)
    fabric.insert("cols/gap1", "", np.uint8, np.ones(2**18, np.uint8))
    one = fabric.create_dataset("cols/one", data=data(1), chunks=CHUNK)
    fabric.insert("cols/gap2", "", np.uint8, np.ones(2**18, np.uint8))
    two = fabric.create_dataset("cols/two", data=data(2), chunks=CHUNK)
    fabric.delete("cols/gap1")
    fabric.delete("cols/gap2")  # holes a defragment moves chunks into, blocks both datasets share
    assert checked(client)["in_columns"] == 2 * N
    wait_published(client, a, [chunk_name(one.id, f) for f in range(N)] + [chunk_name(two.id, f) for f in range(N)])
    wait_published(client, b, [chunk_name(two.id, f) for f in range(N)])
    for step in range(4):
        for worker in where:  # local leases, some of chunks in columns, some materialised
            for seed, ds in ((1, one), (2, two)):
                flats = sorted(rng.choice(N, 3, replace=False).tolist())
                hold_in(client, fabric, worker, ds.name, seed, ds.id, flats, ["chunk", "many", "sel"][step % 3])
        flat = int(rng.integers(N))
        hold(fabric, "cols/one", 1, one.id, [flat], "chunk")  # the client: a global lease
        info = fabric.info(chunk_name(two.id, int(rng.integers(N))))  # materialises that one
        assert info["nbytes"] == CHUNK * 8 and info["locations"]
        checked(client)
        fabric.defragment()
        checked(client)
        views_intact(client, where)
    fabric.delete("cols/one")  # some of its chunks materialised and leased, others in columns
    found = checked(client)
    assert found["in_columns"] <= N, "every chunk of the deleted dataset left the columns"
    fabric.defragment()
    filled = fill(fabric, "cols/filler")  # any memory freed under a view is overwritten now
    views_intact(client, where)
    fabric.delete_prefix("cols/filler")
    assert filled > 0
    drop_everywhere(client, where, seed=1)
    np.testing.assert_array_equal(fabric.dataset("cols/two")[...], data(2))
    assert float(two.to_dask().sum().compute()) == pytest.approx(data(2).sum())  # tasks on the chunks' node
    views_intact(client, where)
    drop_everywhere(client, where)
    fabric.delete("cols/two")
    settled(client, fabric, base)
    assert checked(client)["in_columns"] == 0


def test_chunk_names_used_directly(client, fabric):
    base = used(fabric)
    ds = fabric.create_dataset("cols/named", data=data(3), chunks=CHUNK)
    name = chunk_name(ds.id, 5)
    with pytest.raises(InvalidNameError):
        fabric.delete(name)  # only its dataset's delete may
    with pytest.raises(NameNotFoundError):
        fabric.delete_many([name])
    assert fabric.delete_prefix(CHUNK_PREFIX) == 0
    with pytest.raises(InvalidNameError):
        fabric.insert(chunk_name(ds.id, N), "", np.uint8, np.ones(8, np.uint8))
    assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N, "refusals materialise nothing"
    for wrong in (
        chunk_name(ds.id, N),
        chunk_name(ds.id, 10**30),
        f"{CHUNK_PREFIX}{ds.id}/05",
        f"{CHUNK_PREFIX}{ds.id}/-1",
    ):
        with pytest.raises(NameNotFoundError):
            fabric.get(wrong)
        with pytest.raises(NameNotFoundError):
            fabric.info(wrong)
    np.testing.assert_array_equal(fabric.get(name), expected(3, 5))
    assert fabric.info(chunk_name(ds.id, 6))["nbytes"] == CHUNK * 8
    assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N - 2
    assert not [n for n in fabric.get_list() if n.startswith(CHUNK_PREFIX)]  # materialised or not, never listed
    assert fabric.get_list(CHUNK_PREFIX) == []
    checked(client)
    view = fabric.get(chunk_name(ds.id, 7))
    fabric.delete("cols/named")
    with pytest.raises(NameNotFoundError):
        fabric.get(chunk_name(ds.id, 8))
    np.testing.assert_array_equal(view, expected(3, 7))
    del view
    settled(client, fabric, base)


def test_a_chunk_name_with_digits_int_cannot_read_is_not_found(client, fabric):
    ds = fabric.create_dataset("cols/digits", data=data(4), chunks=CHUNK)
    try:
        for odd in (f"{CHUNK_PREFIX}{ds.id}/\u00b2", f"{CHUNK_PREFIX}\u00b2/0", f"{CHUNK_PREFIX}{ds.id}/\u0665"):
            with pytest.raises(NameNotFoundError):  # superscript two: isdigit, not int(); Arabic-Indic five: int() 5
                fabric.get(odd)
            with pytest.raises(NameNotFoundError):
                fabric.info(odd)
        assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N
    finally:
        fabric.delete("cols/digits")


def read_until_deleted(fabric, name: str, seed: int, dataset_id: int, task_seed: int, seconds: float) -> dict:
    """In a task: read random chunks (get_many, ds[sel], one get) and keep some a while,
    checking their bytes, until the dataset is deleted or time is up."""
    rng = np.random.default_rng(task_seed)
    ds = fabric.dataset(name)
    held: list = []
    counts = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        flats = sorted(rng.choice(N, int(rng.integers(1, 5)), replace=False).tolist())
        try:
            how = int(rng.integers(3))
            if how == 0:
                views = fabric.get_many([chunk_name(dataset_id, f) for f in flats])
            elif how == 1:
                views = [ds[f * CHUNK : (f + 1) * CHUNK] for f in flats]
            else:
                views = [fabric.get(chunk_name(dataset_id, f)) for f in flats]
        except NameNotFoundError:
            counts["deleted"] += 1
            if counts["deleted"] > 3:
                break
            continue
        held += list(zip(flats, views, strict=True))
        for f, view in held:
            counts["bad"] += not np.array_equal(view, expected(seed, f))
        if not counts["reads"]:
            Queue("cols-reading").put(1)
        counts["reads"] += len(flats)
        del held[: max(0, len(held) - 8)]  # the last few kept while others read, move and delete
    Event("cols-filled").wait(60)  # the memory freed by the delete overwritten: the views kept read the same
    counts["bad"] += sum(not np.array_equal(view, expected(seed, f)) for f, view in held)
    return dict(counts)


def test_concurrent_readers_through_defragments_and_the_delete(client, fabric):
    a, b = workers(client)
    base = used(fabric)
    ds = fabric.create_dataset("cols/raced", data=data(8), chunks=CHUNK)
    tasks = [
        client.submit(read_until_deleted, fabric, ds.name, 8, ds.id, k, 20.0, workers=[w], pure=False)
        for k, w in enumerate([a, a, b, b])
    ]
    reading = Queue("cols-reading")
    for _ in tasks:
        reading.get(timeout=60)
    rng = np.random.default_rng(9)
    for step in range(20):  # holes opened and closed beside the chunks, each defragment moves some
        fabric.insert(f"cols/hole{step}", "", np.uint8, np.ones(int(rng.integers(1, 64)) * 4096, np.uint8))
        if step:
            fabric.delete(f"cols/hole{step - 1}")
        fabric.info(chunk_name(ds.id, int(rng.integers(N))))  # one more materialised
        fabric.defragment()
        checked(client)
    fabric.delete(f"cols/hole{step}")
    fabric.delete(ds.name)
    assert fill(fabric, "cols/filler")  # memory freed under a reader's view is overwritten
    Event("cols-filled").set()
    counts = [t.result() for t in tasks]
    fabric.delete_prefix("cols/filler")
    assert all(c.get("bad", 0) == 0 for c in counts), counts
    assert all(c.get("reads", 0) > 0 and c.get("deleted", 0) for c in counts), counts
    del tasks
    settled(client, fabric, base)


def http_leases(dask_scheduler) -> int:
    """Runs on the scheduler: leases held for HTTP readers."""
    d = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory
    return sum(n for v in dict.values(d.by_id) for h, n in v.leases.items() if h.startswith("http-"))


def test_http_reads_of_chunks_in_columns_beside_local_leases_and_defragments(cluster, client, fabric):
    port = http_port(cluster)
    a, b = workers(client)
    base = used(fabric)
    fabric.insert("cols/gap", "", np.uint8, np.ones(2**18, np.uint8))
    ds = fabric.create_dataset("cols/http", data=data(11), chunks=CHUNK)
    fabric.delete("cols/gap")
    wait_published(client, b, [chunk_name(ds.id, f) for f in range(N)])
    hold_in(client, fabric, b, ds.name, 11, ds.id, list(range(0, N, 3)), "many")
    for route in (f"info/{chunk_name(ds.id, 1)}", f"data/{chunk_name(ds.id, 1)}", f"lease/{chunk_name(ds.id, 1)}"):
        answer = api(port, "POST" if route.startswith("lease") else "GET", route)
        assert answer.status == 404, (route, answer.status, answer.body[:200])
    assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N, "refusals materialise nothing"
    rng = np.random.default_rng(12)
    whole = data(11)
    for _ in range(5):
        lo = int(rng.integers(N * CHUNK - 1))
        hi = int(rng.integers(lo + 1, N * CHUNK + 1))
        answer = api(port, "GET", f"data/{ds.name}", format="npy", slice=f"{lo}:{hi}")
        assert answer.status == 200, answer.body[:300]
        np.testing.assert_array_equal(np.load(io.BytesIO(answer.body)), whole[lo:hi])
        fabric.defragment()
        checked(client)
    assert client.run_on_scheduler(http_leases) == 0
    views_intact(client, [b])
    fabric.delete(ds.name)
    views_intact(client, [b])
    drop_everywhere(client, [b])
    settled(client, fabric, base)


def test_blocks_of_chunks_in_columns_deallocated_under_local_leases(client, fabric):
    a, b = workers(client)
    fabric.allocate(64)  # room on the node's other blocks for the migration
    base = used(fabric)
    ds = fabric.create_dataset("cols/migrated", data=data(13), chunks=CHUNK)
    wait_published(client, b, [chunk_name(ds.id, f) for f in range(N)])
    hold_in(client, fabric, b, ds.name, 13, ds.id, list(range(0, N, 4)), "sel")
    blocks = client.run_on_scheduler(blocks_of, dataset_id=ds.id)
    with pytest.raises(BlockInUseError):
        fabric.deallocate(*blocks[0])  # the refusal lists its chunks: materialised
    checked(client)
    for node, shm_id in blocks:
        fabric.deallocate(node, shm_id, migrate=True)  # copies made elsewhere; the views keep the old pages
        checked(client)
    assert checked(client)["in_columns"] == 0
    views_intact(client, [b])
    assert not {loc[1] for f in range(N) for loc in fabric.get_locations(chunk_name(ds.id, f))} & {s for _, s in blocks}
    np.testing.assert_array_equal(fabric.dataset(ds.name)[...], data(13))
    hold_in(client, fabric, b, ds.name, 13, ds.id, list(range(1, N, 4)), "chunk")  # published again where they are
    fabric.delete(ds.name)
    assert fill(fabric, "cols/filler")
    views_intact(client, [b])
    fabric.delete_prefix("cols/filler")
    drop_everywhere(client, [b])
    settled(client, fabric, base)


class DieOnRecall(WorkerPlugin):
    """SIGKILLs its worker (``target`` only) when the YellowPages recalls a variable from it,
    before it answers."""

    name = "cols-die-on-recall"

    def __init__(self, target: str) -> None:
        self.target = target

    def setup(self, worker) -> None:
        if worker.address == self.target:
            worker.stream_handlers["datafabric_recall"] = lambda **_: os.kill(os.getpid(), signal.SIGKILL)


def test_a_reader_killed_by_the_recall_of_its_chunks_in_columns_during_the_delete():
    """Both workers hold chunks in columns under local leases; the dataset's delete recalls
    them and one reader dies on the recall, never answering.  The delete ends, the other
    reader's views keep their bytes, and every byte returns once they are dropped."""
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=32)
        try:
            a, b = workers(client)
            base = used(fabric)
            ds = fabric.create_dataset("cols/recalled", data=data(17), chunks=CHUNK)
            for worker in (a, b):
                wait_published(client, worker, [chunk_name(ds.id, f) for f in range(N)])
                hold_in(client, fabric, worker, ds.name, 17, ds.id, list(range(0, N, 2)), "many")
            assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N
            results_released(client, b)
            pid = client.run(os.getpid, workers=[b])[b]
            client.register_plugin(DieOnRecall(b))
            process = psutil.Process(pid)
            fabric.delete(ds.name)
            process.wait(timeout=60)
            checked(client)
            assert fill(fabric, "cols/filler")
            views_intact(client, [a])
            fabric.delete_prefix("cols/filler")
            drop_everywhere(client, [a])
            settled(client, fabric, base)
        finally:
            fabric.shutdown()


def read_whole(fabric, name: str) -> np.ndarray:
    return np.array(fabric.dataset(name)[...])


def test_edge_chunks_and_unwritten_ones_read_alike_locally_and_globally(client, fabric):
    """Chunks cut by the dataset's edge have their own types, which the columns give by
    flat index: a worker's local leases and the client's materialised variables agree."""
    a, _ = workers(client)
    base = used(fabric)
    values = np.random.default_rng(20).random((50, 30)).astype(np.float32)
    ds = fabric.create_dataset("cols/edges", shape=values.shape, dtype=np.float32, chunks=(16, 16), fillvalue=-1)
    ds[:40] = values[:40]  # rows 48-49 never written: chunks 6 and 7 read as the fill value
    ds.seal()
    want = values.copy()
    want[40:] = -1  # rows 40-47 of written chunks hold the fill value too
    names = [ds.chunk_name(f) for f in range(8) if ds.chunk_name(f) is not None]
    assert len(names) == 6
    wait_published(client, a, names)
    np.testing.assert_array_equal(client.submit(read_whole, fabric, ds.name, workers=[a], pure=False).result(), want)
    assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == 6, "read under local leases"
    np.testing.assert_array_equal(read_whole(fabric, ds.name), want)  # the client: each chunk materialised
    assert fabric.info(ds.chunk_name(5))["nbytes"] == 16 * 14 * 4  # rows 32-47, columns 16-29
    assert [v.shape for v in fabric.get_many(names[-2:])] == [(16, 16), (16, 14)]
    checked(client)
    fabric.delete(ds.name)
    settled(client, fabric, base)
