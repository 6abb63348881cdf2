"""Attacks on the nested rewrite of fused chunk reads (``yp/nesting.py``, ``yp/locality.py``).

In the test process: the graphs Dask's own optimisation makes from ``to_dask`` arrays of a
real dataset (blockwise fusion, linear fusion's aliases, reductions, overlaps, rechunks,
several datasets, a chunk never written), each task rewritten as the YellowPages rewrites
it, run next to the graph as Dask fused it: the same values, every chunk read as often, the
same dependencies.  On the session's cluster: the same shapes end to end, keys submitted
again (persisted, then reused; one graph from two clients at once), ``retries``, inputs
that are futures, fusion switched off, xarray.  And fused tasks of shapes Dask could hand
the hook that nesting must leave alone (external values that are not references or data).
"""

from __future__ import annotations

import logging
import operator
import sys
import threading
from collections import Counter

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
from dask._task_spec import DataNode, Task, TaskRef, _execute_subgraph, convert_legacy_graph
from dask.base import collections_to_expr
from dask.local import get_sync
from distributed import Client, wait

from datafabric.datasets.chunk_reader import ChunkReader
from datafabric.fabric import Fabric
from yp.locality import _chunk_reads, restrict_chunk_tasks
from yp.nesting import nested

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE, CHUNKS = (12, 10), (4, 4)


def with_block_info(block, block_info=None):
    row, col = block_info[0]["chunk-location"]
    return block + 100 * row + col


def fail_once(block, marks, block_id=None):
    """Fails the first try of each block (``marks``: a directory shared by the workers)."""
    mark = marks / f"{block_id[0]}-{block_id[1]}"
    if not mark.exists():
        mark.touch()
        raise RuntimeError(f"first try of block {block_id}")
    return block * 3


def shapes(x, y, a, b):
    """(name, dask array over the datasets x and y, the numpy value over their contents a, b)."""
    return [
        ("add", x + 1, a + 1),
        ("sum", x.sum(), a.sum()),
        ("sum split_every", x.sum(axis=0, split_every=2), a.sum(axis=0)),
        ("mean of two datasets", (x - 2 * y).mean(axis=1), (a - 2 * b).mean(axis=1)),
        ("block_info", x.map_blocks(with_block_info, dtype=x.dtype), _with_block_info(a)),
        ("map_overlap", x.map_overlap(lambda z: z * 2, depth=1, boundary="reflect"), a * 2),
        ("rechunk", (x.rechunk((6, 5)) + 1).sum(axis=1), (a + 1).sum(axis=1)),
        ("slice, linear fusion", x[1:9, 2:7] * 3, a[1:9, 2:7] * 3),
        ("transpose", (x.T + 1)[::2], (a.T + 1)[::2]),
        ("read twice", x * x + y, a * a + b),
        ("where", da.where(x > 0.5, x, y), np.where(a > 0.5, a, b)),
        ("dot", x @ y.T, a @ b.T),
        ("cumsum", x.cumsum(axis=1), a.cumsum(axis=1)),
        ("astype", x.astype(np.float32) + 1, a.astype(np.float32) + 1),
    ]


def _with_block_info(a):
    out = a.copy()
    for i in range(0, SHAPE[0], CHUNKS[0]):
        for j in range(0, SHAPE[1], CHUNKS[1]):
            out[i : i + CHUNKS[0], j : j + CHUNKS[1]] += 100 * (i // CHUNKS[0]) + j // CHUNKS[1]
    return out


@pytest.fixture
def datasets(fabric):
    """Two sealed datasets; x's chunk 1 is never written (its fill value, 7)."""
    rng = np.random.default_rng(5)
    a, b = rng.random(SHAPE), rng.random(SHAPE)
    a[0:4, 4:8] = 7.0
    x = fabric.create_dataset("nest/x", SHAPE, np.float64, chunks=CHUNKS, fillvalue=7.0)
    for i in range(0, SHAPE[0], CHUNKS[0]):
        for j in range(0, SHAPE[1], CHUNKS[1]):
            if (i, j) != (0, 4):
                x[i : i + CHUNKS[0], j : j + CHUNKS[1]] = a[i : i + CHUNKS[0], j : j + CHUNKS[1]]
    x.seal()
    y = fabric.create_dataset("nest/y", data=b, chunks=CHUNKS)
    yield x, y, a, b
    for name in ("nest/x", "nest/y"):
        fabric.delete(name)


def optimized(array) -> dict:
    """The graph as the scheduler receives it: optimised by Dask, in task spec form."""
    return convert_legacy_graph(collections_to_expr([array], True).optimize().__dask_graph__())


def rewritten(graph: dict) -> tuple[dict, int]:
    """``graph`` with every task that reads a chunk rewritten as the hook does; how many changed."""
    out, changed = {}, 0
    for key, task in graph.items():
        if isinstance(task, Task) and set(_chunk_reads(task, 0)):
            out[key] = nested(task)
            changed += out[key] is not task
        else:
            out[key] = task
    return out, changed


def test_every_shape_dask_fuses_computes_the_same_values_and_reads_every_chunk_as_often(datasets, monkeypatch):
    """Run in this process, the rewritten graph and Dask's fused one give the same values,
    get every chunk as many times, and every task keeps its dependencies and data_producer."""
    x, y, a, b = datasets
    reads: Counter = Counter()
    get = Fabric.get

    def counted(self, name, **kwargs):
        reads[name] += 1
        return get(self, name, **kwargs)

    monkeypatch.setattr(Fabric, "get", counted)
    rewrote = 0
    for name, array, expected in shapes(x.to_dask(), y.to_dask(), a, b):
        graph = optimized(array)
        nested_graph, changed = rewritten(graph)
        rewrote += changed
        for key, task in nested_graph.items():
            assert task.dependencies == graph[key].dependencies, (name, key)
            assert task.data_producer == graph[key].data_producer, (name, key)
        keys = array.__dask_keys__()
        reads.clear()
        fused = array.__dask_postcompute__()[0](get_sync(graph, keys), *array.__dask_postcompute__()[1])
        fused_reads = dict(reads)
        reads.clear()
        got = array.__dask_postcompute__()[0](get_sync(nested_graph, keys), *array.__dask_postcompute__()[1])
        assert reads == fused_reads, name
        np.testing.assert_allclose(fused, expected, err_msg=name)
        np.testing.assert_array_equal(got, fused, err_msg=name)
    assert rewrote > 50  # the attack did reach the rewrite


def test_external_values_that_are_neither_references_nor_data_are_left_fused():
    """``_execute_subgraph`` evaluates each external value once and binds it; nesting puts
    the value in each place its key is used.  A value that is a task would then run once
    per use (Dask's blockwise puts a ``concatenate`` task there), and a raw array made the
    rewrite raise (numpy's ``!=`` in ``substitute``), leaving the rest of the graph
    unrestricted.  Both are left as Dask fused them."""
    read = Task("read", operator.add, TaskRef("_0"), TaskRef("_0"))
    out = Task("out", operator.mul, TaskRef("read"), 2)
    calls = Counter()

    def once(v):
        calls[v] += 1
        return v

    as_task = Task("k", _execute_subgraph, {"read": read, "out": out}, "out", ("_0",), Task("_0", once, 5))
    assert nested(as_task) is as_task
    assert as_task({}) == 20 and calls[5] == 1
    as_array = Task("k", _execute_subgraph, {"read": read, "out": out}, "out", ("_0",), np.arange(3))
    assert nested(as_array) is as_array
    np.testing.assert_array_equal(as_array({}), np.arange(3) * 4)
    as_data = Task("k", _execute_subgraph, {"read": read, "out": out}, "out", ("_0",), DataNode(None, 5))
    assert not nested(as_data).has_subgraph() and nested(as_data)({}) == 20


class _Tasks:
    """The scheduler's view the hook needs: task states by key."""

    def __init__(self, graph: dict) -> None:
        self.tasks = {k: _State(v) for k, v in graph.items()}


class _State:
    def __init__(self, spec) -> None:
        self.run_spec, self.worker_restrictions, self.loose_restrictions = spec, None, False


def test_a_task_the_rewrite_leaves_alone_does_not_stop_the_hook_for_the_tasks_after_it():
    """One odd task in a graph (an array as an external value) must not leave the chunk
    reads after it unrestricted."""

    inner = {
        "r": Task("r", ChunkReader(None, "float64", bytes(8)), TaskRef("_0")),
        "out": Task("out", operator.add, TaskRef("r"), TaskRef("_1")),
    }
    odd = Task("a", _execute_subgraph, inner, "out", ("_0", "_1"), DataNode(None, ".dfab/1/0"), np.arange(2))
    plain = Task("b", _execute_subgraph, inner, "out", ("_0", "_1"), DataNode(None, ".dfab/1/1"), DataNode(None, 1))
    scheduler = _Tasks({"a": odd, "b": plain})
    restrict_chunk_tasks(scheduler, ["a", "b"], lambda name: [f"worker-of-{name}"])
    assert scheduler.tasks["a"].run_spec is odd and scheduler.tasks["a"].worker_restrictions == {"worker-of-.dfab/1/0"}
    assert not scheduler.tasks["b"].run_spec.has_subgraph()
    assert scheduler.tasks["b"].worker_restrictions == {"worker-of-.dfab/1/1"}


# -- on the session's cluster -----------------------------------------------------------


def _nested_on_scheduler(dask_scheduler=None) -> int:
    """Tasks held by the scheduler that read a chunk as a rewritten (nested) call."""
    from yp.locality import _chunk_reads

    count = 0
    for ts in dask_scheduler.tasks.values():
        spec = ts.run_spec
        if isinstance(spec, Task) and not spec.has_subgraph() and set(_chunk_reads(spec, 0)):
            count += not isinstance(spec.func, ChunkReader)  # not a read alone, unfused
    return count


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record) -> None:
        self.seen.append(record.getMessage())


def _watch_warnings(dask_scheduler=None) -> None:
    handler = _Warnings()
    dask_scheduler._dfab_warnings = handler
    logging.getLogger("distributed.scheduler").addHandler(handler)


def _warnings_seen(dask_scheduler=None) -> list[str]:
    handler = dask_scheduler.__dict__.pop("_dfab_warnings")
    logging.getLogger("distributed.scheduler").removeHandler(handler)
    return [m.split("\n")[0] for m in handler.seen]


def test_every_shape_end_to_end_on_the_cluster_with_fusion_on_and_off(client, fabric, datasets):
    x, y, a, b = datasets
    client.run_on_scheduler(_watch_warnings)
    try:
        for active in (None, False, True):
            with dask.config.set({"optimization.fuse.active": active}):
                for name, array, expected in shapes(x.to_dask(), y.to_dask(), a, b):
                    np.testing.assert_allclose(array.compute(), expected, err_msg=f"{name}, fuse {active}")
        stored = fabric.from_dask("nest/stored", (x.to_dask() + 1).T)  # da.store of a to_dask array
        np.testing.assert_allclose(stored[...], (a + 1).T)
        fabric.delete("nest/stored")
    finally:
        assert [m for m in client.run_on_scheduler(_warnings_seen) if "run_spec" in m] == []


def test_keys_submitted_again_meet_the_rewritten_spec_without_conflict(client, datasets):
    """Persist ``x + 1`` (its tasks rewritten), then compute graphs holding the same keys:
    a new collection of the same keys while they are held, a sum over them, the same graph
    from two clients at once.  Dask warns of a different run_spec for a key whose
    dependencies differ from the spec it holds; none may appear, and every value is right."""
    x, _, a, _ = datasets
    client.run_on_scheduler(_watch_warnings)
    try:
        held = (x.to_dask() + 1).persist()
        wait(held)
        held_nested = client.run_on_scheduler(_nested_on_scheduler)
        assert held_nested == 8  # 9 chunks, the one never written is not a read of a chunk name
        again = x.to_dask() + 1
        assert again.name == held.name
        np.testing.assert_allclose(again.compute(), a + 1)
        np.testing.assert_allclose((again.sum(axis=0) + held.sum(axis=0)).compute(), 2 * (a + 1).sum(axis=0))
        np.testing.assert_allclose(held.compute(), a + 1)
        results: dict = {}

        def compute_in(i: int) -> None:
            with Client(client.scheduler.address) as other:
                results[i] = other.compute(x.to_dask() + 1).result()

        threads = [threading.Thread(target=compute_in, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(results) == [0, 1]
        for got in results.values():
            np.testing.assert_allclose(got, a + 1)
        del held
    finally:
        assert [m for m in client.run_on_scheduler(_warnings_seen) if "run_spec" in m] == []


def test_retries_run_the_rewritten_task_again_to_the_right_value(client, datasets, tmp_path):
    x, _, a, _ = datasets
    array = x.to_dask().map_blocks(fail_once, tmp_path, dtype=x.dtype)
    future = client.compute(array, retries=1)
    np.testing.assert_allclose(future.result(), a * 3)
    assert len(list(tmp_path.iterdir())) == 9


def test_inputs_that_are_futures_and_xarray(client, datasets):
    x, _, a, _ = datasets
    offsets = da.from_array(np.arange(SHAPE[1], dtype=np.float64), chunks=CHUNKS[1]).persist()
    np.testing.assert_allclose((x.to_dask() + offsets).compute(), a + np.arange(SHAPE[1]))
    scattered = client.scatter(np.float64(5), broadcast=True)
    got = x.to_dask().map_blocks(lambda z, s: z * s, scattered, dtype=x.dtype).compute()
    np.testing.assert_allclose(got, a * 5)
    xr = pytest.importorskip("xarray")
    arr = xr.DataArray(x.to_dask(), dims=("t", "s"))
    np.testing.assert_allclose((arr + 1).mean("s").compute().values, (a + 1).mean(axis=1))


def test_fused_graphs_nesting_would_run_differently_from_execute_subgraph_are_left_fused():
    """``_execute_subgraph`` binds the external values over the inner graph's keys, runs
    every inner node, and runs level by level; a nested task would take the inner task
    where an external value has its key, drop a node the output does not reach, and
    recurse once per level (running, pickling, tokenizing)."""
    shadowed = Task(
        "k",
        _execute_subgraph,
        {"a": Task("a", operator.neg, TaskRef("x")), "out": Task("out", operator.add, TaskRef("a"), 1)},
        "out",
        ("a", "x"),
        DataNode(None, 10),
        DataNode(None, 3),
    )
    assert shadowed({}) == 11 and nested(shadowed) is shadowed
    cycle = {
        "out": Task("out", operator.pos, TaskRef("c")),
        "c": Task("c", operator.neg, TaskRef("x")),
        "a": Task("a", operator.pos, TaskRef("b")),
        "b": Task("b", operator.pos, TaskRef("a")),
    }
    unreached = Task("k", _execute_subgraph, cycle, "out", ("x",), TaskRef("x"))
    assert nested(unreached) is unreached
    chain = [Task("t0", operator.neg, TaskRef("x"))]
    chain += [Task(f"t{i}", operator.add, TaskRef(f"t{i - 1}"), 1) for i in range(1, 300)]
    deep = Task.fuse(*chain, key="k")
    assert nested(deep) is deep and deep({"x": 1}) == 298
    dask.base.tokenize(nested(deep))


@pytest.mark.parametrize(("operations", "rewritten"), [(30, 8), (62, 0)])
def test_long_chains_the_hook_finds_a_read_in_are_restricted_and_nested_only_while_shallow(
    datasets, operations, rewritten
):
    """62 fused operations on a read: the longest chain in which the hook still finds it.
    Nested that deep, ``dask.tokenize`` of the task recursed past Python's limit; so it
    is restricted and left fused, and a shorter chain is nested.  Values are Dask's."""
    x, _, a, _ = datasets
    array, expected = x.to_dask(), a.copy()
    for _ in range(operations):
        array, expected = array + 1, expected + 1
    graph = optimized(array)
    scheduler = _Tasks(graph)
    restrict_chunk_tasks(scheduler, list(graph), lambda name: ["w"])
    specs = {k: ts.run_spec for k, ts in scheduler.tasks.items()}
    assert sum(not s.has_subgraph() for s in specs.values()) == rewritten  # not the never written chunk's: no read
    assert sum(bool(ts.worker_restrictions) for ts in scheduler.tasks.values()) == 8
    for spec in specs.values():
        dask.base.tokenize(spec)
    got = array.__dask_postcompute__()[0](get_sync(specs, array.__dask_keys__()), *array.__dask_postcompute__()[1])
    np.testing.assert_allclose(got, expected)
