"""Datasets on two simulated nodes: writers on either node into chunks homed on the
other (worker to worker), reads on both, and to_dask's chunk tasks on the node holding
each chunk, through graph optimisation's fusion."""

from __future__ import annotations

import sys

import cloudpickle
import dask
import numpy as np
from distributed import wait

from tests.test_nodes import nfabric, node_workers, nodes_client  # noqa: F401  (fixtures)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write(ds, key, value):
    ds[key] = value
    return dask.config.get("datafabric.node-id")


def here(block):
    return np.full((1,) * block.ndim, dask.config.get("datafabric.node-id"), dtype=object)


def test_writers_on_both_nodes_and_reads_on_both(nodes_client, nfabric):  # noqa: F811
    per_node = node_workers(nodes_client)
    a0, b0 = per_node["node-a"][0], per_node["node-b"][0]
    ds = nfabric.create_dataset("n/x", (40, 40), np.int32, chunks=(20, 40), fillvalue=-1)
    assert nodes_client.submit(write, ds, slice(0, 20), 1, workers=[a0]).result() == "node-a"  # homes chunk 0 on a
    assert nodes_client.submit(write, ds, slice(20, 40), 2, workers=[b0]).result() == "node-b"  # chunk 1 on b
    nodes_client.submit(write, ds, (slice(5, 25), slice(0, 10)), 3, workers=[b0]).result()  # into a's chunk too
    ds.seal()
    nodes = [nfabric.get_locations(ds.chunk_name(f))[0][0] for f in (0, 1)]
    assert nodes == ["node-a", "node-b"]
    expected = np.repeat([1, 2], 20)[:, None] * np.ones(40, np.int32)
    expected[5:25, 0:10] = 3
    for worker in (a0, b0):
        got = nodes_client.submit(lambda d: d[...], ds, workers=[worker]).result()
        np.testing.assert_array_equal(got, expected)
    nfabric.delete("n/x")


def test_to_dask_tasks_run_on_the_node_holding_each_chunk(nodes_client, nfabric):  # noqa: F811
    per_node = node_workers(nodes_client)
    ds = nfabric.create_dataset("n/y", (8, 6), np.float64, chunks=(2, 3))
    homes = {}
    for i, node in enumerate(["node-a", "node-b", "node-b", "node-a"]):
        homes[i] = node
        nodes_client.submit(write, ds, slice(2 * i, 2 * i + 2), float(i), workers=[per_node[node][0]]).result()
    ds.seal()
    x = ds.to_dask()
    where = x.map_blocks(here, dtype=object, chunks=(1, 1)).compute()  # the read fuses into map_blocks' task
    for (i, j), node in np.ndenumerate(where):
        assert node == homes[i], (i, j, node)
    np.testing.assert_allclose(x.sum().compute(), sum(2 * 6 * float(i) for i in range(4)))
    y = nfabric.from_dask("n/z", x * 2)
    for flat in range(8):  # each chunk stored by the worker that computed it: beside its input
        assert nfabric.get_locations(y.chunk_name(flat))[0][0] == homes[flat // 2]
    for name in ("n/y", "n/z"):
        nfabric.delete(name)


def _specs(name, dask_scheduler=None):
    """Per task computing part of ``name`` (not the aliases Dask's linear fusion leaves
    under the output keys): does it run a graph of its own, and where may it run."""
    from dask._task_spec import Task

    return {
        str(k): (ts.run_spec.has_subgraph(), sorted(ts.worker_restrictions or ()))
        for k, ts in dask_scheduler.tasks.items()
        if f"{name}-" in str(k) and isinstance(ts.run_spec, Task)
    }


def test_fused_chunk_reads_run_nested_and_stay_on_their_node(nodes_client, nfabric):  # noqa: F811
    """``(x + 1)``: each read fused into the add becomes one nested call in the scheduler
    (``yp/nesting.py``), still restricted to its chunk's node; ``(x * x)`` uses the read
    twice, so it stays fused as Dask made it; both compute the right values."""
    per_node = node_workers(nodes_client)
    ds = nfabric.create_dataset("n/f", (4, 6), np.float64, chunks=(2, 3))
    for i, node in enumerate(["node-a", "node-b"]):
        nodes_client.submit(write, ds, slice(2 * i, 2 * i + 2), float(i + 2), workers=[per_node[node][0]]).result()
    ds.seal()
    x = ds.to_dask()
    expected = np.repeat([2.0, 3.0], 12).reshape(4, 6)
    for made, name, fused in (((x + 1).persist(), "add", False), ((x * x).persist(), "mul", True)):
        wait(made)
        specs = nodes_client.run_on_scheduler(_specs, name=name)
        assert len(specs) == 4
        for key, (subgraph, workers) in specs.items():
            row = int(key.split(", ")[1])
            assert subgraph == fused, key
            assert workers == sorted(per_node[["node-a", "node-b"][row]]), key
        np.testing.assert_array_equal(made.compute(), expected + 1 if not fused else expected**2)
        del made
    nfabric.delete("n/f")
