"""Views that Dask moves between two simulated nodes in both directions at once.

A reference reaching a node with no copy is turned back into a view by reading the
bytes from a worker of the other node, over that worker's event loop; where Dask reads
the message the receiver's own loop waits for that read.  Two workers receiving each
other's views at once each waited for the other's blocked loop until
``loopcalls.CALL_TIMEOUT`` (60 s), and the tasks failed with ``WorkerLostError``.  A
view now crosses to another node as its bytes (``datafabric.handshake``), so no loop
waits for another's.  Here the wait is made likely (each fetch on a loop first sleeps
long enough for the other loop to be blocked too, if the other's reference has arrived:
a loop asleep cannot serve the other's transfer, so a round waits only in 2 or 3 of 5) and bounded (a 10 s timeout in the
workers), and then churned: both directions at once, slices of every kind, checksums."""

from __future__ import annotations

import sys
import time

import cloudpickle
import numpy as np
import pytest
from distributed import wait

import datafabric
from tests.conftest import simulated_nodes
from tests.test_datasets_nodes import write
from tests.test_nodes import NODES, insert_here, node_workers

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHORT_TIMEOUT = 10.0  # seconds: what a loop waits for a read in these tests (the product's is 60)
STALL = 3.0  # seconds a fetch on an event loop sleeps first, so both loops are blocked at once


def stall_fetches_on_loops(on: bool) -> None:
    """In a worker: make a loop's fetch of another node's bytes wait first (and the
    loops' calls time out sooner), or undo it."""
    from datafabric import loopcalls, references

    if on:
        original = references._fetch
        if getattr(original, "stalled", False):
            return

        def stalled(ctx, info):
            if references.on_event_loop():
                time.sleep(STALL)
            return original(ctx, info)

        stalled.stalled = True
        stalled.original, stalled.timeout = original, loopcalls.CALL_TIMEOUT
        references._fetch = stalled
        loopcalls.CALL_TIMEOUT = SHORT_TIMEOUT
    elif getattr(references._fetch, "stalled", False):
        loopcalls.CALL_TIMEOUT = references._fetch.timeout
        references._fetch = references._fetch.original


@pytest.fixture(scope="module")
def nodes_client():
    """One worker per node: the read a loop waits for is served by the other node's
    only worker, whose loop is the one blocked."""
    with simulated_nodes(NODES, per_node=1) as (_, client):
        yield client


@pytest.fixture
def nfabric(nodes_client):
    fabric = datafabric.start(nodes_client, mb=2 * 32)
    yield fabric
    fabric.shutdown()


@pytest.fixture
def stalled(nodes_client):
    nodes_client.run(stall_fetches_on_loops, True)
    yield
    nodes_client.run(stall_fetches_on_loops, False)


def a_slice(fabric, name, index):
    return fabric.get(name)[index]


def checksum(x):
    from datafabric.references import pin_of

    arr = np.asarray(x)
    return float(arr.sum()), arr.shape, pin_of(arr) is not None


def both_ways(client, fabric, a, b, index, tag):
    """A slice of a variable homed on ``a``'s node read there, one of ``b``'s read on
    ``b``; then each consumed on the other worker, at once."""
    on_a = client.submit(a_slice, fabric, f"{tag}-a", index, workers=[a], pure=False)
    on_b = client.submit(a_slice, fabric, f"{tag}-b", index, workers=[b], pure=False)
    wait([on_a, on_b])
    return (
        client.submit(checksum, on_b, workers=[a], pure=False),
        client.submit(checksum, on_a, workers=[b], pure=False),
    )


def test_views_crossing_both_ways_at_once_arrive_without_a_loop_waiting(nodes_client, nfabric, stalled):
    per_node = node_workers(nodes_client)
    a, b = per_node["node-a"][0], per_node["node-b"][0]
    da, db = np.arange(50_000, dtype=np.float64), np.arange(50_000, dtype=np.float64)[::-1] * 3
    nodes_client.submit(insert_here, nfabric, "x-a", da, workers=[a]).result()
    nodes_client.submit(insert_here, nfabric, "x-b", db, workers=[b]).result()
    start = time.monotonic()
    for index in (slice(7, None, 5), slice(None, 900), slice(None, None, -2)):  # one round in 2 or 3 waits alone
        on_a_of_b, on_b_of_a = both_ways(nodes_client, nfabric, a, b, index, "x")
        assert on_a_of_b.result(timeout=3 * SHORT_TIMEOUT) == (float(db[index].sum()), db[index].shape, False)
        assert on_b_of_a.result(timeout=3 * SHORT_TIMEOUT) == (float(da[index].sum()), da[index].shape, False)
    assert time.monotonic() - start < SHORT_TIMEOUT  # no read waited out the timeout


class Holder:
    """An object Dask's serialisers do not take apart: it is pickled, views and all."""

    def __init__(self, views):
        self.views = views


def held_slices(fabric, name, index):
    view = fabric.get(name)
    return Holder({"slice": view[index], "nested": [view[:10], (view[-3:],)]})


def held_checksum(holder):
    from datafabric.references import pin_of

    arrays = [holder.views["slice"], holder.views["nested"][0], holder.views["nested"][1][0]]
    return [(float(x.sum()), x.shape, pin_of(x) is not None, x.flags.writeable) for x in arrays]


def test_views_inside_pickled_objects_cross_both_ways_as_bytes(nodes_client, nfabric, stalled):
    per_node = node_workers(nodes_client)
    a, b = per_node["node-a"][0], per_node["node-b"][0]
    datas = {"a": np.arange(20_000, dtype=np.float64) * 2, "b": np.arange(20_000, dtype=np.float64)[::-1].copy()}
    nodes_client.submit(insert_here, nfabric, "h-a", datas["a"], workers=[a]).result()
    nodes_client.submit(insert_here, nfabric, "h-b", datas["b"], workers=[b]).result()
    index = slice(100, 5000, 9)
    on_a = nodes_client.submit(held_slices, nfabric, "h-a", index, workers=[a], pure=False)
    on_b = nodes_client.submit(held_slices, nfabric, "h-b", index, workers=[b], pure=False)
    wait([on_a, on_b])
    start = time.monotonic()
    got = {
        "b": nodes_client.submit(held_checksum, on_b, workers=[a], pure=False),
        "a": nodes_client.submit(held_checksum, on_a, workers=[b], pure=False),
    }
    for node, future in got.items():
        d = datas[node]
        expected = [(float(x.sum()), x.shape, False, False) for x in (d[index], d[:10], d[-3:])]
        assert future.result(timeout=3 * SHORT_TIMEOUT) == expected
    assert time.monotonic() - start < SHORT_TIMEOUT


INDEXES = {  # per number of dimensions: whole, stepped, reversed, transposed, a column
    1: [slice(None), slice(11, 9000, 7), slice(None, None, -3)],
    2: [(slice(2, 40), slice(None, None, 2)), (slice(None), 5), (Ellipsis, slice(1, 30, 4)), np.s_[::-1, 3:]],
}


def test_churn_views_crossing_both_ways_with_checksums(nodes_client, nfabric, stalled):
    per_node = node_workers(nodes_client)
    rng = np.random.default_rng(7)
    shapes = {0: (20_000,), 1: (200, 60)}
    datas = {}
    for i, shape in shapes.items():
        for node in ("a", "b"):
            datas[i, node] = rng.integers(0, 1000, size=shape).astype(np.float64)
            home = per_node[f"node-{node}"][0]
            nodes_client.submit(insert_here, nfabric, f"c{i}-{node}", datas[i, node], workers=[home]).result()
    start = time.monotonic()
    pending = []
    for round_ in range(8):
        i = round_ % 2
        choices = INDEXES[len(shapes[i])]
        index = choices[(round_ // 2) % len(choices)]
        a, b = per_node["node-a"][0], per_node["node-b"][0]
        on_a_of_b, on_b_of_a = both_ways(nodes_client, nfabric, a, b, index, f"c{i}")
        pending.append((on_a_of_b, datas[i, "b"][index]))
        pending.append((on_b_of_a, datas[i, "a"][index]))
    for future, expected in pending:
        assert future.result(timeout=3 * SHORT_TIMEOUT) == (float(expected.sum()), expected.shape, False)
    assert time.monotonic() - start < 2 * SHORT_TIMEOUT


ROW_NODES = ["node-a", "node-b", "node-a", "node-b"]


def test_a_rechunk_across_chunks_of_both_nodes(nodes_client, nfabric, stalled):
    """The case first seen stalling: ``(ds.to_dask().rechunk(...) + 1).mean(...)`` over
    chunks homed on both nodes (whether both loops block at once depends on Dask's
    order of transfers: the tests above make it certain)."""
    per_node = node_workers(nodes_client)
    a = np.arange(8 * 60, dtype=np.float64).reshape(8, 60)
    x = nfabric.create_dataset("rc/x", (8, 60), np.float64, chunks=(2, 30))
    for i, node in enumerate(ROW_NODES):
        rows = slice(2 * i, 2 * i + 2)
        nodes_client.submit(write, x, rows, a[rows], workers=[per_node[node][0]]).result()
    x.seal()
    for chunks in ((8, 15), (3, 60), (5, 7)):
        got = (x.to_dask().rechunk(chunks) + 1).mean(axis=0).compute(timeout=3 * SHORT_TIMEOUT)
        np.testing.assert_array_equal(got, (a + 1).mean(axis=0))
