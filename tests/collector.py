"""What Python's cyclic garbage collector walks from an object: a full collection follows
every reference held by every object it tracks, so a structure a process keeps per name
must hold its entries where the collector never looks (dicts of plain values, bytes,
ints), or each full collection of that process grows with the names.  And collections
that a test can count on: a ``gc.collect()`` called while another thread's collection
runs Python code (a finalizer, a callback: a client's event loop, say) returns at once,
having collected nothing."""

from __future__ import annotations

import gc
import time
import types
from collections.abc import Callable


def collect(done: Callable[[], bool]) -> None:
    """Full collections until ``done()``, for ten seconds at most."""
    deadline = time.monotonic() + 10
    while gc.collect() >= 0 and not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def walked_from(root: object) -> int:
    """The references a full collection follows from ``root`` and the tracked objects it
    reaches, not counting those behind classes, modules and functions (shared code, the
    same whatever ``root`` holds).  Measured after a full collection: the collector
    untracks tuples and dicts holding only plain values when it first passes them, so
    before one the count depends on how many allocations came since the last (a CI run
    saw the same table walk 5199 and 5343); and taken again after another collection
    until two counts agree."""
    last = None
    while (count := _walk(root)) != last:
        last = count
    return count


def _walk(root: object) -> int:
    gc.collect()
    seen: set[int] = set()
    todo, references = [root], 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or not gc.is_tracked(obj):
            continue
        seen.add(id(obj))
        if isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        referents = gc.get_referents(obj)
        references += len(referents)
        todo.extend(referents)
    return references
