"""Attack on the views a client keeps through a scheduler restart (docs "Scheduler
restart, as built": clients that reconnect declare the views they kept): a declaration
that arrives after the variable was deleted and its place reused.

Real processes as ``test_restart.py`` runs them (``tests/processes.py``).
"""

from __future__ import annotations

import asyncio
import sys
import threading

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric import context
from tests.test_restart import NODES, listed, pin_of, processes, worker_of  # noqa: F401  (fixture)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DECLARE_LATE = 3.0  # seconds this client takes to declare its kept views after a take-back


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def replace(fabric, old: str, new: str, data: np.ndarray) -> None:
    """Another process deletes ``old`` and inserts ``new``, of the same size, type and doc,
    into the room it left."""
    fabric.delete(old)
    fabric.insert(new, "", np.float64, data)


@pytest.mark.xfail(
    strict=True,
    reason="acquire_at leases whatever variable is at a kept view's offset now: a view whose variable "
    "was deleted before its client declared it leases the variable placed there since",
)
def test_a_kept_view_declared_after_its_variable_was_replaced_leases_nothing_else(processes, monkeypatch):  # noqa: F811
    """A client on node A keeps a view of "x" through the crash and declares it late.
    Meanwhile another process deletes "x" and inserts "y" in its place.  The late
    declaration must not take a lease of "y" (the view is not "y"'s): deleting "y" frees
    its memory at once."""
    original, declared = context._declare_kept_views, threading.Event()

    async def declare_late(*args):
        await asyncio.sleep(DECLARE_LATE)
        await original(*args)
        declared.set()

    monkeypatch.setattr(context, "_declare_kept_views", declare_late)
    data = np.arange(100_000.0)
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        fabric.insert("x", "", np.float64, data)
        view = fabric.get("x")
        assert not view.flags.owndata, "the client maps node A's block"
        lease = pin_of(view).lease

        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: listed(fabric) == ["x"], "x came back")
        a = worker_of(client)[NODES[0]]
        client.submit(replace, fabric, "x", "y", data + 1, workers=[a], pure=False).result()
        assert declared.wait(60), "the client never declared its kept views"
        assert listed(fabric) == ["y"]
        assert lease["var_id"] != fabric._ctx().call("info", name="y")["var_id"], "the kept view of x leases y"
        fabric.delete("y")
        wait_for(lambda: used(fabric) == 0, f"y is held by the kept view of x (lease {lease})", timeout=10)
        del view
        fabric.shutdown()
