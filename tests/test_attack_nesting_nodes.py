"""The nested rewrite of fused chunk reads on two simulated nodes: every rewritten task
that reads one chunk stays restricted to the workers of the node holding it, whatever
consumes the read (``map_blocks`` with ``block_info``, a reduction with ``split_every``);
one reading two datasets' chunks is nested and unrestricted; all compute the right values.

A rechunk is not here: its reads are not fused, and Dask moves the views between the
nodes both ways at once, which stalled the two workers' event loops for the 60 s of
``loopcalls.CALL_TIMEOUT`` in two runs of four (each loop waits, unpickling a
reference, for a read the other loop would serve), outside the rewrite."""

from __future__ import annotations

import sys

import cloudpickle
import dask
import numpy as np
from distributed import wait

from tests.test_datasets_nodes import write
from tests.test_nodes import nfabric, node_workers, nodes_client  # noqa: F401  (fixtures)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROW_NODES = ["node-a", "node-b", "node-b", "node-a"]  # the node writing (so homing) each row of chunks


def where_with_info(block, block_info=None):
    row, col = block_info[0]["chunk-location"]
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = (dask.config.get("datafabric.node-id"), row, col)
    return out


def reads_on_scheduler(dask_scheduler=None) -> list[tuple[bool, list[str], list[str]]]:
    """Per task reading one chunk: is it nested (rewritten), the chunk, where it may run."""
    from dask._task_spec import Task

    from datafabric.datasets.chunk_reader import ChunkReader
    from yp.locality import _chunk_reads

    found = []
    for ts in dask_scheduler.tasks.values():
        spec = ts.run_spec
        if isinstance(spec, Task) and len(names := set(_chunk_reads(spec, 0))) == 1:
            rewritten = not spec.has_subgraph() and not isinstance(spec.func, ChunkReader)
            found.append((rewritten, sorted(names), sorted(ts.worker_restrictions or ())))
    return found


def test_rewritten_reads_stay_on_the_node_of_their_chunk_whatever_consumes_them(nodes_client, nfabric):  # noqa: F811
    per_node = node_workers(nodes_client)
    a = np.arange(48, dtype=np.float64).reshape(8, 6)
    x = nfabric.create_dataset("nn/x", (8, 6), np.float64, chunks=(2, 3))
    for i, node in enumerate(ROW_NODES):
        rows = slice(2 * i, 2 * i + 2)
        nodes_client.submit(write, x, rows, a[rows], workers=[per_node[node][0]]).result()
    x.seal()
    y = nfabric.create_dataset("nn/y", data=a * 10, chunks=(2, 3))
    node_of = {x.chunk_name(f): nfabric.get_locations(x.chunk_name(f))[0][0] for f in range(8)}
    node_of.update({y.chunk_name(f): nfabric.get_locations(y.chunk_name(f))[0][0] for f in range(8)})
    xd, yd = x.to_dask(), y.to_dask()
    cases = [
        (xd.map_blocks(where_with_info, dtype=object, chunks=(1, 1)), None),
        ((xd * 2).sum(axis=1, split_every=2), (a * 2).sum(axis=1)),
        ((xd - yd) * 3, (a - a * 10) * 3),
    ]
    rewrote = 0
    for array, expected in cases:
        held = array.persist()
        wait(held)
        reads = nodes_client.run_on_scheduler(reads_on_scheduler)
        rewrote += sum(rewritten for rewritten, _, _ in reads)
        for rewritten, (name,), workers in reads:
            assert workers == per_node[node_of[name]], (array.name, name, rewritten)
        got = held.compute()
        if expected is None:
            for (row, col), (node, r, c) in np.ndenumerate(got):
                assert (r, c) == (row, col) and node == ROW_NODES[row], (row, col, node)
        else:
            np.testing.assert_allclose(got, expected)
        del held
    assert rewrote == 8 + 8  # map_blocks', the partial sums' (the difference's read two chunks: not listed)
    for name in ("nn/x", "nn/y"):
        nfabric.delete(name)
