"""Tasks that read a dataset's chunk run on a worker of a node holding it.

``Dataset.to_dask`` builds one task per chunk calling the dataset's ``ChunkReader``
(``datafabric/datasets/chunk_reader.py``) with the chunk variable's name.  Annotations would say where to run it, but graph
optimisation drops them when it fuses the read into the task consuming it
(dask/dask#7036).  So the YellowPages looks at every task entering the scheduler
(``update_graph``, before any is scheduled): a task whose spec, fused or not, calls
a ``ChunkReader`` gets worker restrictions to the nodes holding that chunk.  They are loose:
if those workers die, the task runs elsewhere and reads the chunk over the network.
The same look rewrites a fused read as one nested call (``yp/nesting.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from dask._task_spec import DataNode, Task, TaskRef

from datafabric.datasets.chunk_reader import ChunkReader
from datafabric.names import is_chunk_name
from yp.nesting import nested

_MAX_DEPTH = 6  # a fused task nests its parts one level per fusion; a chunk read is a root
_MAX_ITEMS = 64  # containers longer than this in a task's arguments are data, not tasks


def restrict_chunk_tasks(scheduler: Any, keys: list, workers_for: Callable[[str], list[str]]) -> None:
    for key in keys:
        ts = scheduler.tasks.get(key)
        if ts is None or ts.run_spec is None or ts.worker_restrictions:
            continue
        names = set(_chunk_reads(ts.run_spec, 0))
        if names:
            ts.run_spec = nested(ts.run_spec)
        if len(names) != 1:
            continue  # no chunk read, or several (a fused reduction): nothing to pin it to
        workers = workers_for(names.pop())
        if workers:
            ts.worker_restrictions = set(workers)
            ts.loose_restrictions = True


def _chunk_reads(node: Any, depth: int, bound: dict | None = None) -> Iterator[str]:
    """Chunk names read in ``node``; ``bound``: what the references of an inner graph of
    a fused task stand for (the outer task's arguments, by inner key)."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, Task):
        if node.has_subgraph():  # _execute_subgraph(inner graph, out key, inner keys, *their values)
            inner, _, keys, *values = node.args
            if isinstance(inner, dict) and isinstance(keys, tuple | list):
                scope = {**(bound or {}), **dict(zip(keys, values, strict=False))}
                yield from _chunk_reads(inner, depth + 1, scope)
            return
        if isinstance(node.func, ChunkReader):
            yield from (a for a in _values(node.args, bound or {}) if isinstance(a, str) and is_chunk_name(a))
            return
        for arg in (*node.args, *node.kwargs.values()):
            yield from _chunk_reads(arg, depth + 1, bound)
    elif isinstance(node, DataNode):
        yield from _chunk_reads(node.value, depth + 1, bound)
    elif isinstance(node, dict) and len(node) <= _MAX_ITEMS:
        for value in node.values():
            yield from _chunk_reads(value, depth + 1, bound)
    elif isinstance(node, list | tuple) and len(node) <= _MAX_ITEMS:
        for value in node:
            yield from _chunk_reads(value, depth + 1, bound)


def _values(args: tuple, bound: dict) -> Iterator[Any]:
    for a in args:
        if isinstance(a, TaskRef):
            a = bound.get(a.key)
        yield a.value if isinstance(a, DataNode) else a
