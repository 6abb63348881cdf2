"""Attacks on chunks kept in columns (``yp/chunk_columns.py``) across nodes and processes:
replicas on a second simulated node and their eviction, the chunks' owner SIGKILLed and
adopted, a reader and then the owner closing, a scheduler restart with views kept, a delete
while the chunks' block waits for adoption, and views of chunks travelling as references.
The method is ``test_attack_columns.py``'s (``tests.columns``).
"""

from __future__ import annotations

import os
import pickle
import sys

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client, Event

import datafabric
from datafabric.errors import FabricError, ReferenceGoneError
from datafabric.names import chunk_name
from tests.columns import (
    CHUNK,
    N,
    audit,
    check_kept,
    checked,
    data,
    drop_everywhere,
    drop_kept,
    expected,
    fill,
    hold,
    hold_in,
    in_columns_of,
    kept,
    owners_of,
    settled,
    used,
    views_intact,
    write,
)
from tests.conftest import local_cluster, simulated_nodes
from tests.test_lifecycle import workers
from tests.test_local_reads import wait_published
from tests.test_restart import NODES, listed, pin_of, processes  # noqa: F401  (fixture)
from tests.waiting import kill_and_wait, results_released, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- two nodes: replicas, eviction, an owner SIGKILLed ---------------------------------------
def test_replicas_evicted_and_an_owner_killed_under_readers_then_the_delete():
    with simulated_nodes(["a", "b"], per_node=2) as (_, client):
        fabric = datafabric.start(client, mb=4 * 8)
        try:
            _replicas_eviction_and_adoption(client, fabric)
        finally:
            fabric.shutdown()


def _replicas_eviction_and_adoption(client, fabric) -> None:
    env = client.run(lambda: dask.config.get("datafabric.node-id"))
    on = {node: sorted(w for w, n in env.items() if n == node) for node in ("a", "b")}
    base = used(fabric)
    settled(client, fabric, base)
    ds = fabric.create_dataset("cols/nodes", shape=(N * CHUNK,), dtype=np.float64, chunks=CHUNK)
    assert client.submit(write, ds, data(5), workers=[on["a"][0]]).result() == "a"
    ds.seal()
    [owner] = client.run_on_scheduler(owners_of, dataset_id=ds.id)
    [reader_a] = [w for w in on["a"] if w != owner]
    reader_b = on["b"][0]
    names = [chunk_name(ds.id, f) for f in range(N)]
    for f in range(8):  # replicas on node b: those chunks are materialised
        assert {loc[0] for loc in fabric.replicate(names[f], ["b"])} == {"a", "b"}
    assert checked(client)["in_columns"] == N - 8
    wait_published(client, reader_b, names[:8])
    wait_published(client, reader_a, names)
    hold_in(client, fabric, reader_b, ds.name, 5, ds.id, [0, 1, 2, 3], "many")  # local leases of replicas
    hold_in(client, fabric, reader_b, ds.name, 5, ds.id, [12, 13], "chunk")  # remote: through node b
    hold_in(client, fabric, reader_a, ds.name, 5, ds.id, [4, 5] + list(range(16, N)), "sel")  # mostly in columns
    hold(fabric, ds.name, 5, ds.id, [20], "chunk")
    checked(client)
    filled = client.submit(fill, fabric, "cols/b-filler", workers=[reader_b], pure=False).result()  # evicts on b
    assert filled > 0
    nodes = [{loc[0] for loc in fabric.get_locations(names[f])} for f in range(N)]
    assert all(nodes[f] == {"a", "b"} for f in (0, 1, 2, 3, 12, 13)), nodes  # leased on b: kept
    assert all(nodes[f] == {"a"} for f in (4, 5, 6, 7)), nodes  # unleased on b: evicted, all, before a refusal
    views_intact(client, [reader_a, reader_b])
    checked(client)
    fabric.delete_prefix("cols/b-filler")
    results_released(client, owner)
    kill_and_wait(client.run(os.getpid, workers=[owner])[owner])  # reader_a adopts its blocks
    wait_for(
        lambda: np.array_equal(fabric.dataset(ds.name)[...], data(5)),
        "the dataset read whole after the adoption",
        ignoring=(FabricError,),
    )
    assert {b["worker"] for b in fabric.status() if b["node"] == "a"} == {reader_a}
    views_intact(client, [reader_a, reader_b])
    checked(client)
    fabric.delete(ds.name)  # views on both nodes, chunks in columns, materialised, replicated, adopted
    filled = fill(fabric, "cols/filler")
    views_intact(client, [reader_a, reader_b])
    fabric.delete_prefix("cols/filler")
    drop_everywhere(client, [reader_a, reader_b])
    settled(client, fabric, base)
    assert checked(client)["in_columns"] == 0


# -- one node: readers and the owner closing -------------------------------------------------
def test_a_reader_then_the_owner_closing_while_their_tasks_hold_chunks_in_columns():
    """A closing worker's local leases of chunks in columns are recalled in its handoff
    (``recall_worker``'s columnar ids) and end when it leaves; the closing owner's blocks
    are adopted by a peer, whose views keep their bytes through the dataset's delete."""
    with simulated_nodes(["a"], per_node=3) as (_, client):
        fabric = datafabric.start(client, mb=3 * 8)
        try:
            base = used(fabric)
            fabric.insert("cols/gap", "", np.uint8, np.ones(2**18, np.uint8))
            ds = fabric.create_dataset("cols/closing", data=data(6), chunks=CHUNK)
            fabric.delete("cols/gap")
            [owner] = client.run_on_scheduler(owners_of, dataset_id=ds.id)
            leaving, staying = [w for w in sorted(client.scheduler_info()["workers"]) if w != owner]
            for worker in (leaving, staying):
                wait_published(client, worker, [chunk_name(ds.id, f) for f in range(N)])
            hold_in(client, fabric, leaving, ds.name, 6, ds.id, list(range(0, N, 2)), "many")
            hold_in(client, fabric, staying, ds.name, 6, ds.id, list(range(1, N, 2)), "chunk")
            assert checked(client)["in_columns"] == N, "local leases materialise nothing"
            client.retire_workers([leaving], close_workers=True)
            wait_for(lambda: leaving not in client.scheduler_info()["workers"], "the reader gone")
            checked(client)
            moved = set(fabric.defragment()["moved"])  # the leaving reader's chunks are movable again
            assert moved & {chunk_name(ds.id, f) for f in range(0, N, 2)}, moved
            assert not moved & {chunk_name(ds.id, f) for f in range(1, N, 2)}, moved
            views_intact(client, [staying])
            client.retire_workers([owner], close_workers=True)  # its peer adopts its blocks
            wait_for(lambda: owner not in client.scheduler_info()["workers"], "the owner gone")
            wait_for(lambda: {b["worker"] for b in fabric.status()} == {staying}, "the adoption")
            views_intact(client, [staying])
            checked(client)
            np.testing.assert_array_equal(fabric.dataset(ds.name)[...], data(6))
            fabric.delete(ds.name)
            fill(fabric, "cols/filler")
            views_intact(client, [staying])
            fabric.delete_prefix("cols/filler")
            drop_everywhere(client, [staying])
            settled(client, fabric, base)
        finally:
            fabric.shutdown()


# -- a scheduler restart with views kept ------------------------------------------------------
def test_views_of_chunks_kept_through_a_scheduler_restart(processes):  # noqa: F811
    """A client on node A keeps views of chunks (materialised by its global leases; the
    others stay in columns) of a dataset whose chunks sit after a hole; the scheduler is
    SIGKILLed and started again.  The rebuilt dataset reads right, a defragment leaves the
    views' chunks where they are, a dataset sealed by the new YellowPages (in columns)
    shares the block, and both deletes leave the views intact and every byte free."""
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        fabric.insert("cols/gap", "", np.uint8, np.ones(2**18, np.uint8))
        ds = fabric.create_dataset("cols/restarted", data=data(14), chunks=CHUNK)
        fabric.delete("cols/gap")
        hold(fabric, ds.name, 14, ds.id, [2, 9, 17], "chunk")
        assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N - 3
        granted = {key: pin_of(view).lease["var_id"] for key, view in kept().items()}  # ids of the dead incarnation
        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: listed(fabric) == ["cols/restarted"], "the dataset rebuilt")
        wait_for(lambda: not client.run_on_scheduler(audit)["problems"], "the directory settled", timeout=30)
        wait_for(lambda: all(pin_of(v).lease["var_id"] != granted[k] for k, v in kept().items()), "views declared")
        moved: set[str] = set()
        wait_for(  # once the take-back's round ends (every client declared), the others fill the hole
            lambda: moved.update(fabric.defragment()["moved"]) or moved & {chunk_name(ds.id, f) for f in range(N)},
            "a defragment moving chunks",
        )
        assert not moved & {chunk_name(ds.id, f) for f in (2, 9, 17)}, "a kept view's chunk was moved"
        np.testing.assert_array_equal(fabric.dataset(ds.name)[...], data(14))
        assert check_kept() == []
        newer = fabric.create_dataset("cols/newer", data=data(15), chunks=CHUNK)
        assert client.run_on_scheduler(in_columns_of, dataset_id=newer.id) == N
        checked(client)
        fabric.delete(ds.name)
        assert fill(fabric, "cols/filler")
        assert check_kept() == []
        np.testing.assert_array_equal(fabric.dataset(newer.name)[...], data(15))
        fabric.delete_prefix("cols/filler")
        fabric.delete(newer.name)
        drop_kept()
        settled(client, fabric, 0)
        fabric.shutdown()


# -- eviction when the free room is in pieces ---------------------------------------------------
K = 1024


def insert_held(fabric, name: str, nbytes: int, held: bool) -> None:
    """In a task on node b: an insert of ``nbytes`` in this worker's block, its view kept or not."""
    fabric.insert(name, "", np.uint8, np.full(nbytes, 1, np.uint8))
    if held:
        kept()[name] = fabric.get(name)


def test_a_copy_evicts_a_replica_when_the_room_counted_free_is_in_pieces():
    """Node b's one block: [p0 held][200K free][p1 held][60K free][replica R][60K free][p2 held].
    320K free in all, the largest 200K; a replica of 256K asked for b: compaction slides R
    left (120K free beside it), only evicting R (unleased, b's copy of a variable of node a)
    makes 320K in one piece."""
    with simulated_nodes(["a", "b"], per_node=1) as (_, client):
        fabric = datafabric.start(client, mb=4)  # one 2 MiB block per node
        try:
            b = [w for w, n in client.run(lambda: dask.config.get("datafabric.node-id")).items() if n == "b"][0]
            fabric.insert("ev/x", "", np.uint8, np.full(200 * K, 2, np.uint8))
            fabric.insert("ev/y", "", np.uint8, np.full(256 * K, 3, np.uint8))  # both on a: b has no client
            for name, nbytes, held in (("ev/p0", 100, True), ("ev/h1", 200, False), ("ev/p1", 100, True)):
                client.submit(insert_held, fabric, name, nbytes * K, held, workers=[b], pure=False).result()
            client.submit(insert_held, fabric, "ev/h2", 60 * K, False, workers=[b], pure=False).result()
            assert {loc[0] for loc in fabric.replicate("ev/x", ["b"])} == {"a", "b"}  # R, after h2
            client.submit(insert_held, fabric, "ev/h3", 60 * K, False, workers=[b], pure=False).result()
            [row] = [r for r in fabric.status() if r["node"] == "b"]
            client.submit(insert_held, fabric, "ev/p2", row["largest_free"] - 4 * K, True, workers=[b]).result()
            for name in ("ev/h1", "ev/h2", "ev/h3"):
                fabric.delete(name)
            [row] = [r for r in fabric.status() if r["node"] == "b"]
            assert row["largest_free"] < 256 * K <= row["free"] < 256 * K + 200 * K, row
            assert {loc[0] for loc in fabric.replicate("ev/y", ["b"])} == {"a", "b"}
            assert {loc[0] for loc in fabric.get_locations("ev/x")} == {"a"}, "R evicted"
            client.submit(drop_kept, workers=[b], pure=False).result()
        finally:
            fabric.shutdown()


# -- a delete while the chunks' block has no owner -------------------------------------------
def test_a_dataset_deleted_while_its_chunks_block_waits_for_adoption():
    """Node a's only worker holds the chunks and is SIGKILLed; until its nanny's new worker
    adopts the block, the dataset is deleted (chunks in columns, and replicas on node b
    that b's task holds).  b's views keep their bytes; the adopter frees the rest."""
    with simulated_nodes(["a", "b"], per_node=1) as (_, client):
        fabric = datafabric.start(client, mb=2 * 8)
        try:
            on = {n: w for w, n in client.run(lambda: dask.config.get("datafabric.node-id")).items()}
            base = used(fabric)
            ds = fabric.create_dataset("cols/orphaned", shape=(N * CHUNK,), dtype=np.float64, chunks=CHUNK)
            assert client.submit(write, ds, data(16), workers=[on["a"]]).result() == "a"
            ds.seal()
            hold_in(client, fabric, on["b"], ds.name, 16, ds.id, [3, 4, 5], "many")  # remote: replicas on b
            assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N - 3
            results_released(client, on["a"])
            kill_and_wait(client.run(os.getpid, workers=[on["a"]])[on["a"]])
            wait_for(lambda: any(r["worker"] is None for r in fabric.status()), "node a's block orphaned")
            assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N - 3, "adopted already"
            fabric.delete(ds.name)
            checked(client)
            wait_for(lambda: all(r["worker"] is not None for r in fabric.status()), "the adoption", timeout=90)
            assert fill(fabric, "cols/filler")
            views_intact(client, [on["b"]])
            fabric.delete_prefix("cols/filler")
            drop_everywhere(client, [on["b"]])
            settled(client, fabric, base)
        finally:
            fabric.shutdown()


def chunk_view(ds, flat: int):
    return ds.chunk(flat)  # a task's result: travels as a reference to the chunk's var id


def test_views_of_chunks_in_columns_travel_as_references_leased_by_id(client, fabric):
    a, b = workers(client)
    base = used(fabric)
    ds = fabric.create_dataset("cols/refs", data=data(18), chunks=CHUNK)
    wait_published(client, a, [chunk_name(ds.id, f) for f in range(N)])
    views = client.gather([client.submit(chunk_view, ds, f, workers=[a], pure=False) for f in (1, 2, 3)])
    for f, view in zip((1, 2, 3), views, strict=True):  # leased here by id: each materialised
        assert not view.flags.owndata
        np.testing.assert_array_equal(view, expected(18, f))
    assert client.run_on_scheduler(in_columns_of, dataset_id=ds.id) == N - 3
    later = pickle.dumps(chunk_view(ds, 4))  # a reference to a chunk, kept as bytes
    checked(client)
    fabric.delete(ds.name)
    [sent] = client.scatter([views[0]], workers=[b], direct=True)  # to b's process, not through the scheduler
    total = client.submit(lambda v: float(v.sum()), sent, workers=[b], pure=False).result()
    assert total == expected(18, 1).sum()  # a deleted chunk some view holds: still leased by id
    assert fill(fabric, "cols/filler")
    for f, view in zip((1, 2, 3), views, strict=True):
        np.testing.assert_array_equal(view, expected(18, f))
    fabric.delete_prefix("cols/filler")
    del views, view, sent
    settled(client, fabric, base)
    with pytest.raises(ReferenceGoneError):
        pickle.loads(later)


def test_a_chunk_view_passed_as_a_task_argument_leaves_no_lease_on_the_scheduler():
    with local_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=32)
        try:
            _, b = workers(client)
            base = used(fabric)
            ds = fabric.create_dataset("cols/argument", data=data(19), chunks=CHUNK)
            view = ds.chunk(2)
            assert client.submit(lambda v: float(v.sum()), view, workers=[b], pure=False).result() == pytest.approx(
                expected(19, 2).sum()
            )
            fabric.delete(ds.name)
            del view
            wait_for(lambda: used(fabric) == base, "the deleted chunk's memory", timeout=15)
        finally:
            fabric.shutdown()


# -- everything at once -----------------------------------------------------------------------
def read_until_stopped(fabric, seeds: dict, task_seed: int) -> dict:
    """In a task: read random chunks of the datasets ``seeds`` names (name -> (seed, id)),
    keeping the last few, checking every view kept, until the test says stop."""
    rng = np.random.default_rng(task_seed)
    stop, held, counts = Event("cols-stop"), [], {"reads": 0, "bad": 0}
    while not stop.is_set():
        name = sorted(seeds)[int(rng.integers(len(seeds)))]
        seed, dataset_id = seeds[name]
        flats = sorted(rng.choice(N, 3, replace=False).tolist())
        views = fabric.get_many([chunk_name(dataset_id, f) for f in flats])
        held += [(seed, f, v) for f, v in zip(flats, views, strict=True)]
        counts["bad"] += sum(not np.array_equal(v, expected(s, f)) for s, f, v in held)
        counts["reads"] += len(flats)
        del held[: max(0, len(held) - 12)]
    return counts


def test_readers_on_two_nodes_through_replicas_evictions_defragments_and_datasets_coming_and_going():
    with simulated_nodes(["a", "b"], per_node=2) as (_, client):
        fabric = datafabric.start(client, mb=4 * 8)
        try:
            on = {
                n: sorted(w for w, m in client.run(lambda: dask.config.get("datafabric.node-id")).items() if m == n)
                for n in ("a", "b")
            }
            base = used(fabric)
            steady = {}
            for seed in (30, 31):
                ds = fabric.create_dataset(f"cols/steady{seed}", shape=(N * CHUNK,), dtype=np.float64, chunks=CHUNK)
                client.submit(write, ds, data(seed), workers=[on["a"][seed % 2]]).result()
                steady[ds.seal().name] = (seed, ds.id)
            readers = [
                client.submit(read_until_stopped, fabric, steady, k, workers=[w], pure=False)
                for k, w in enumerate([on["a"][0], on["a"][1], on["b"][0]])
            ]
            rng = np.random.default_rng(32)
            coming = []
            for step in range(24):
                kind = int(rng.integers(5))
                name, (seed, dataset_id) = sorted(steady.items())[int(rng.integers(2))]
                if kind == 0:  # a replica on b, materialising the chunk
                    fabric.replicate(chunk_name(dataset_id, int(rng.integers(N))), ["b"])
                elif kind == 1:  # b fills from a task there: unleased replicas evicted
                    client.submit(fill, fabric, f"cols/b{step}", workers=[on["b"][1]], pure=False).result()
                    fabric.delete_prefix(f"cols/b{step}/")
                elif kind == 2:
                    fabric.defragment()
                elif kind == 3:  # a dataset sealed, one deleted, some of their chunks read by name
                    ds = fabric.create_dataset(f"cols/coming{step}", data=data(step), chunks=CHUNK)
                    np.testing.assert_array_equal(fabric.get(chunk_name(ds.id, step % N)), expected(step, step % N))
                    coming.append(ds.name)
                    if len(coming) > 2:
                        fabric.delete(coming.pop(0))
                else:
                    np.testing.assert_array_equal(fabric.dataset(name)[...], data(seed))
                checked(client)
            Event("cols-stop").set()
            counts = client.gather(readers)
            assert all(c["bad"] == 0 and c["reads"] > 0 for c in counts), counts
            del readers
            for name in list(steady) + coming:
                fabric.delete(name)
            settled(client, fabric, base)
            assert checked(client)["in_columns"] == 0
        finally:
            fabric.shutdown()
