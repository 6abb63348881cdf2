"""An import's chunk writes (``writes.fill_chunks``) on two simulated nodes: in one ticket,
a chunk whose home is on the writer's node is filled through its mapping, one homed on
the other node through a buffer sent to the home's owner; both read back exactly on both
nodes."""

from __future__ import annotations

import sys

import cloudpickle
import dask
import numpy as np

from datafabric.datasets.writes import fill_chunks
from tests.test_nodes import nfabric, node_workers, nodes_client  # noqa: F401  (fixtures)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def fill(ds, indices):
    def into(view, index):
        view[...] = np.arange(view.size, dtype=view.dtype).reshape(view.shape) + 100 * (index[0] + 1)

    fill_chunks(ds, indices, into)
    return dask.config.get("datafabric.node-id")


def test_fill_chunks_writes_through_the_mapping_or_to_the_homes_owner(nodes_client, nfabric):  # noqa: F811
    per_node = node_workers(nodes_client)
    a0, b0 = per_node["node-a"][0], per_node["node-b"][0]
    ds = nfabric.create_dataset("files/x", (30, 8), np.float64, chunks=(10, 8), fillvalue=-1)
    nodes_client.submit(lambda d: d.__setitem__((slice(0, 10),), 0.5), ds, workers=[a0]).result()  # chunk 0 on a
    # chunk 0 sent to a's owner, chunk 1 homed on b and mapped: one ticket
    assert nodes_client.submit(fill, ds, [(0, 0), (1, 0)], workers=[b0]).result() == "node-b"
    ds.seal()
    expected = np.full((30, 8), -1.0)
    expected[:10] = np.arange(80).reshape(10, 8) + 100
    expected[10:20] = np.arange(80).reshape(10, 8) + 200
    assert [nfabric.get_locations(ds.chunk_name(f))[0][0] for f in (0, 1)] == ["node-a", "node-b"]
    for worker in (a0, b0):
        np.testing.assert_array_equal(nodes_client.submit(lambda d: d[...], ds, workers=[worker]).result(), expected)
    nfabric.delete("files/x")
