"""A fused chunk read runs as one nested call, not as a graph of its own.

Blockwise fusion folds ``to_dask``'s read of a chunk into the task that consumes it
(``ds.to_dask().sum()``: read, then sum) as ``Task.fuse`` does: one task calling Dask's
``_execute_subgraph``, which orders its small inner graph with ``dask.order`` and runs it
with ``execute_graph`` every time it runs.  On a 16 MiB chunk that cost 120-180 µs of the
worker's task thread, a tenth of the sum itself, and the same array persisted in worker
memory pays none of it.  When the inner graph is a tree (every inner result used exactly
once, by one argument, and the output reached from every node), the same computation is
one ``Task`` whose arguments are the inner tasks themselves, nested: each runs once, in
the place its result was used, with the same values, and with nothing around it.

The YellowPages rewrites the run spec of tasks that read a chunk as they enter the
scheduler (``yp/locality.py``), before any is scheduled.  Anything else (an inner result
used twice or never reached, an inner node that is not a plain task, more inner tasks
than nesting may recurse through, an inner key an external value overrides, an external
value that is not a reference or data, a spec of another shape) is left as Dask fused it:
``_execute_subgraph`` would run it otherwise than the nested calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from dask._task_spec import DataNode, Task, TaskRef

# Nested calls recurse, a Python frame or more a level, as the task runs, is pickled and is
# tokenized (``dask.tokenize`` of a chain hit the recursion limit between 50 and 63 levels,
# well within the 64 inner tasks in which ``yp/locality.py`` still finds a read); a fused
# graph runs level by level.
_MAX_NODES = 32


def nested(task: Task) -> Task:
    """``task`` (a fused ``_execute_subgraph`` task) as one task of nested tasks, or
    ``task`` itself when its inner graph is not a tree of plain tasks."""
    if not task.has_subgraph():
        return task
    inner, outkey, inkeys, *values = task.args
    if not isinstance(inner, dict) or outkey not in inner or len(inkeys) != len(values):
        return task
    if len(inner) > _MAX_NODES or not inner.keys().isdisjoint(inkeys):
        return task  # too deep to nest; or an inner key whose value the outer one overrides
    if not all(isinstance(v, TaskRef | DataNode) for v in values):
        # ``_execute_subgraph`` evaluates each external value once; nested, a value goes
        # where each use of its key is, so a task there (blockwise's ``concatenate`` of a
        # contracted input) would run once per use, and a raw value is no node to place.
        return task
    if not all(type(t) is Task and not t.has_subgraph() for t in inner.values()):
        return task  # containers, aliases, data, fused tasks: not rewritten
    uses = Counter(key for t in inner.values() for key in _refs(t) if key in inner)
    if uses[outkey] or set(uses) != inner.keys() - {outkey} or any(n != 1 for n in uses.values()):
        return task  # not a tree: a result used twice would be computed twice
    given = dict(zip(inkeys, values, strict=True))
    built: list[Any] = []

    def build(key: Any) -> Task:
        built.append(key)
        t = inner[key]
        subs = {d: build(d) if d in inner else given[d] for d in t.dependencies if d in inner or d in given}
        return t.substitute(subs) if subs else t

    out = build(outkey)
    if len(built) != len(inner):
        return task  # a node the output does not reach (a cycle): ``execute_graph`` runs every node
    rewritten = Task(task.key, out.func, *out.args, _data_producer=task.data_producer, **out.kwargs)
    return rewritten if rewritten.dependencies == task.dependencies else task


def _refs(node: Any) -> Iterator[Any]:
    """The key of every reference in ``node``'s arguments, once per occurrence."""
    if isinstance(node, TaskRef):
        yield node.key
    elif isinstance(node, Task):
        for arg in (*node.args, *node.kwargs.values()):
            yield from _refs(arg)
    elif isinstance(node, DataNode):
        return
    elif isinstance(node, dict):
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list | tuple | set | frozenset):
        for value in node:
            yield from _refs(value)
