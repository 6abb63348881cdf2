"""Attacks on sealed datasets' chunks kept in columns (``yp/chunk_columns.py``).

The promise: a chunk in columns is a variable in its plainest state, materialised in one
step by any protocol that needs more, and never recorded twice.  Each test drives real
worker processes over real shared memory, seeded, and after every step runs ``audit`` on
the scheduler: no chunk both in columns and in ``variables``/``by_id``, the sorted index
and its dict agree, and every block's ``used`` is exactly the sum of the extents recorded
in it (materialised copies, chunks in columns, reservations).  Views are checked against
their expected bytes while they live; the owners' ``status()`` figures come back exactly
once everything is deleted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import sys
import time
from collections import Counter

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client, Event, Queue, get_worker

import datafabric
from datafabric.errors import BlockInUseError, FabricError, InvalidNameError, NameNotFoundError, OutOfSpaceError
from datafabric.names import CHUNK_PREFIX, chunk_name
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.conftest import simulated_nodes
from tests.http_helpers import api, http_port
from tests.test_lifecycle import workers
from tests.test_local_reads import wait_published
from tests.test_restart import NODES, listed, pin_of, processes  # noqa: F401  (fixture)
from tests.waiting import kill_and_wait, results_released, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHUNK = 4096  # float64 elements a chunk: 32 KiB
N = 24  # chunks a dataset


# -- the scheduler's side ------------------------------------------------------------------
def audit(dask_scheduler) -> dict:
    """Runs on the scheduler, building nothing: what breaks the columns' promise."""
    from yp.chunk_columns import GONE

    d = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory
    problems: list = []
    used: Counter[str] = Counter()
    for var in dict.values(d.by_id):
        for c in var.copies:
            used[c.shm_id] += c.extent_size
    for name, var in dict.items(d.variables):
        if dict.get(d.by_id, var.var_id) is not var:
            problems.append(("named but not by id", name))
    if set(d.variables._list) != set(dict.keys(d.variables)):
        problems.append(("sorted index differs from its dict", len(d.variables._list), dict.__len__(d.variables)))
    in_columns = 0
    for columns in d.columns:
        for i in np.flatnonzero(columns.block != GONE).tolist():
            in_columns += 1
            name, var_id = columns.name(i), columns.first_id + i
            if dict.__contains__(d.variables, name) or dict.__contains__(d.by_id, var_id):
                problems.append(("two records", name))
            used[columns.shm_ids[columns.block[i]]] += int(columns.extent_size[i])
        if columns.left != int((columns.block != GONE).sum()):
            problems.append(("left miscounted", columns.dataset_id))
    for var in dict.values(d.by_id):
        if left := sorted(h for h in var.leases if h in d.departed):
            problems.append(("leased by a process that left", var.name, left))
    if dangling := [v for v in d.published if not dict.__contains__(d.by_id, v)]:
        problems.append(("published but unknown", dangling[:5]))
    for p in d.pending.values():
        used[p.copy.shm_id] += p.copy.extent_size
    for shm_id, block in d.blocks.items():
        if block.used != used.get(shm_id, 0):
            problems.append(("used", shm_id, block.used, used.get(shm_id, 0)))
    return {"problems": problems, "in_columns": in_columns, "used": sum(b.used for b in d.blocks.values())}


def checked(client) -> dict:
    found = client.run_on_scheduler(audit)
    assert not found["problems"], found["problems"]
    return found


def used(fabric) -> int:
    """What the blocks' owners count as used."""
    return sum(b["used"] for b in fabric.status())


def settled(client, fabric, expected: int) -> None:
    """The owners' figures and the directory's agree, and are ``expected``."""
    wait_for(lambda: used(fabric) == expected == checked(client)["used"], f"used == {expected}: {fabric.status()}")


# -- the data and the views ----------------------------------------------------------------
def data(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(N * CHUNK)


def expected(seed: int, flat: int) -> np.ndarray:
    return data(seed)[flat * CHUNK : (flat + 1) * CHUNK]


def kept() -> dict:
    """Views a test keeps alive in a worker (or the client) between steps: (seed, flat, how) -> view."""
    try:
        return get_worker().__dict__.setdefault("_dfab_columns", {})
    except ValueError:  # the client
        return _client_kept


_client_kept: dict = {}


def hold(fabric, name: str, seed: int, dataset_id: int, flats: list[int], how: str) -> int:
    """Views of chunks kept: by ``chunk`` (one get each), ``many`` (get_many) or ``sel``
    (``ds[sel]`` of one chunk's rows).  Returns how many are kept."""
    ds = fabric.dataset(name)
    assert ds.id == dataset_id
    if how == "many":
        views = fabric.get_many([chunk_name(dataset_id, f) for f in flats])
    elif how == "sel":
        views = [ds[f * CHUNK : (f + 1) * CHUNK] for f in flats]
    else:
        views = [ds.chunk(f) for f in flats]
    for f, view in zip(flats, views, strict=True):
        assert not view.flags.owndata, "a zero-copy view"
        kept()[seed, f, how] = view
    return len(kept())


def check_kept() -> list:
    """The kept views whose bytes are not their chunk's."""
    return [key for key, view in kept().items() if not np.array_equal(view, expected(key[0], key[1]))]


def drop_kept(seed: int | None = None) -> None:
    for key in [k for k in kept() if seed is None or k[0] == seed]:
        del kept()[key]


def hold_in(client, fabric, worker, name, seed, dataset_id, flats, how) -> None:
    client.submit(hold, fabric, name, seed, dataset_id, flats, how, workers=[worker], pure=False).result()


def views_intact(client, where: list) -> None:
    for worker in where:
        assert client.submit(check_kept, workers=[worker], pure=False).result() == [], worker
    assert check_kept() == [], "the client's views"


def drop_everywhere(client, where: list, seed: int | None = None) -> None:
    for worker in where:
        client.submit(drop_kept, seed, workers=[worker], pure=False).result()
    drop_kept(seed)


def fill(fabric, prefix: str) -> int:
    """Insert 256 KiB variables of -7 until nothing fits: memory freed under a view is written over."""
    n = 0
    while True:
        try:
            fabric.insert(f"{prefix}/{n}", "", np.float64, np.full(2**15, -7.0))
        except OutOfSpaceError:
            return n
        n += 1


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


def in_columns_of(dask_scheduler, dataset_id: int) -> int:
    columns = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory.columns.by_dataset.get(dataset_id)
    return 0 if columns is None else columns.left


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


def slow(dask_scheduler, component: str, method: str, seconds: float) -> None:
    """Runs on the scheduler: ``component.method`` (a coroutine) waits ``seconds`` first;
    0 puts the original back."""
    target = dask_scheduler.plugins[SCHEDULER_PLUGIN]
    for part in component.split("."):
        target = getattr(target, part)
    target.__dict__.pop(method, None)
    if seconds:
        original = getattr(target, method)

        async def slowed(*args, **kwargs):
            await asyncio.sleep(seconds)
            return await original(*args, **kwargs)

        setattr(target, method, slowed)


@pytest.mark.parametrize("component,method", [("owners", "mark_chunks"), ("datasets.records", "write")])
def test_a_dataset_deleted_mid_seal_while_its_chunks_are_read_by_name_and_moved(client, fabric, component, method):
    """Between the seal's columns and its end the chunks are known by name: a get of one
    materialises it, a defragment moves them, the delete ends the seal; the view keeps its
    bytes and every byte comes back."""
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


def blocks_of(dask_scheduler, dataset_id: int) -> list[tuple[str, str]]:
    """Runs on the scheduler: (node, shm_id) of the blocks the dataset's chunks were sealed in."""
    d = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory
    return [(d.blocks[s].node, s) for s in d.columns.by_dataset[dataset_id].shm_ids]


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


# -- two nodes: replicas, eviction, an owner SIGKILLed ---------------------------------------
def owners_of(dask_scheduler, dataset_id: int) -> list[str]:
    """Runs on the scheduler: the owners of the blocks the dataset's chunks were sealed in."""
    d = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory
    return sorted({d.blocks[s].worker for s in d.columns.by_dataset[dataset_id].shm_ids})


def write(ds, values) -> str:
    ds[...] = values
    return dask.config.get("datafabric.node-id")


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
    assert any(nodes[f] == {"a"} for f in (4, 5, 6, 7)), nodes  # unleased on b: evicted to make room
    views_intact(client, [reader_a, reader_b])
    checked(client)
    fabric.delete_prefix("cols/b-filler")
    results_released(client, owner)
    kill_and_wait(client.run(__import__("os").getpid, workers=[owner])[owner])  # reader_a adopts its blocks
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
        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: listed(fabric) == ["cols/restarted"], "the dataset rebuilt")
        wait_for(lambda: not client.run_on_scheduler(audit)["problems"], "the directory settled", timeout=30)
        granted = {key: pin_of(view).lease["var_id"] for key, view in kept().items()}
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
