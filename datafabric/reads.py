"""Reads with no round trip: local leases in a task, and ``get_many``.

In a task (or any thread of a worker's process), a name its worker's node holds is leased
in process from what the YellowPages pushed to that worker (``worker_plugin.local_reads``),
with no RPC even the first time.  ``get_many`` takes every view it can that way (or from
this process's cache) and the rest with one ``acquire_many`` RPC; only a name with no copy
on this node costs more (the bytes come from another node, as with ``get``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import distributed
import numpy as np

from datafabric import arguments
from datafabric.names import validate_name

if TYPE_CHECKING:
    from datafabric.views import LocalState
    from worker_plugin.local_reads import LocalReads


# fabric id -> (worker, its local reads) of each worker of this process serving the fabric:
# one, but for a cluster of threads (``LocalCluster(processes=False)``).  Replaced, never
# changed in place: a get reads it without a lock.
_serving: dict[str, tuple[tuple[Any, LocalReads], ...]] = {}
_serving_lock = threading.Lock()


def serve(fabric_id: str, worker: Any, reads: LocalReads) -> None:
    """The worker plugin's, at setup: from now on gets in this process may lease locally
    what the YellowPages publishes to ``worker``."""
    with _serving_lock:
        _serving[fabric_id] = (*_serving.get(fabric_id, ()), (worker, reads))


def stop_serving(fabric_id: str, reads: LocalReads) -> None:
    """At the plugin's teardown: gets ask the YellowPages again."""
    with _serving_lock:
        rest = tuple(served for served in _serving.get(fabric_id, ()) if served[1] is not reads)
        if rest:
            _serving[fabric_id] = rest
        else:
            _serving.pop(fabric_id, None)


def task_reads(fabric_id: str, address: str) -> LocalReads | None:
    """The local reads of this process's worker, if it serves this fabric (of the
    scheduler at ``address``); None elsewhere.  One dict read and no ``Context``: a
    task's first get costs what the lease costs, and little around it (every step of
    an interpreter running cold in a new task costs µs).  Any thread of the worker's
    process may lease locally, as a task does: the lease is the worker's.  Where several
    workers share the process, only a task may, under its own worker's grants (a lease
    held by another worker would end when that one leaves)."""
    served = _serving.get(fabric_id)
    if not served:
        return None
    if len(served) == 1:
        worker, reads = served[0]
    else:
        try:
            me = distributed.get_worker()
        except ValueError:
            return None  # not a task
        mine = [pair for pair in served if pair[0] is me]
        if not mine:
            return None
        worker, reads = mine[0]
    return reads if worker.scheduler.address == address else None


class ManyReads:
    """``Fabric.get_many``; a mixin of ``Fabric``."""

    fabric_id: str
    address: str
    _state: LocalState

    def get_many(self, names: Iterable[str]) -> list[np.ndarray]:
        """``[get(n) for n in names]`` with at most one round trip to the YellowPages in
        all, none when every name is held on this node and this is a task (or every view
        is alive in this process already).  A name not found refuses the whole call
        before any lease is kept."""
        names = arguments.names(names)
        out: list[np.ndarray | None] = [self._state.cached_view(n) for n in names]
        remaining = [i for i, view in enumerate(out) if view is None]
        if not remaining:
            return out  # type: ignore[return-value]
        reads = task_reads(self.fabric_id, self.address)  # type: ignore[attr-defined]
        if reads is not None:  # one lock for the batch; a published name is a valid one
            asked, remaining = remaining, []
            for i, pin in zip(asked, reads.pin_many([names[i] for i in asked]), strict=True):
                if pin is None:
                    remaining.append(i)
                else:
                    out[i] = pin.view()
            if not remaining:
                return out  # type: ignore[return-value]
        for i in remaining:
            validate_name(names[i])
        ctx = self._ctx()  # type: ignore[attr-defined]
        if remaining:
            since = self._state.epoch  # before the leases: see ``LocalState.pin``
            infos = ctx.call("acquire_many", names=[names[i] for i in remaining], holder=ctx.holder)
            leases = [{"op": "datafabric_release", "var_id": info["var_id"], "holder": ctx.holder} for info in infos]
            try:
                for k, (i, info) in enumerate(zip(remaining, infos, strict=True)):
                    leases[k] = None  # the pin holds it next, or it is released below, or as _local_pin fails
                    pin = self._local_pin(ctx, info, names[i], since)  # type: ignore[attr-defined]
                    if pin is None:  # no copy here: fetched like get (a replica, or a private copy)
                        ctx.send({"op": "datafabric_release", "var_id": info["var_id"], "holder": ctx.holder})
                        out[i] = self.get(names[i])  # type: ignore[attr-defined]
                    else:
                        out[i] = pin.view()
            finally:
                for lease in leases:
                    if lease is not None:
                        ctx.send(lease)
        return out  # type: ignore[return-value]
