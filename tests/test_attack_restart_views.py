"""Attacks on the views a client keeps through a scheduler restart (docs "Views kept through
a scheduler crash"): its variable deleted and its room reused before the client declares
the view, within the take-back's wait for declarations (the view keeps its bytes) and after
it (the declaration leases nothing else).

Real processes as ``test_restart.py`` runs them (``tests/processes.py``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import cloudpickle
import dask
import numpy as np
from distributed import Client

import datafabric
from datafabric import context
from datafabric.errors import OutOfSpaceError
from tests.test_restart import NODES, listed, pin_of, processes, worker_of  # noqa: F401  (fixture)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DECLARE_LATE = 6.0  # seconds this client takes to declare its kept views after a take-back
SHORT_WAIT = 1  # the restarted scheduler's datafabric.kept-views-wait, in the test past it
LONG_WAIT = 30  # and in the test within it


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def replace(fabric, old: str, new: str, data: np.ndarray) -> None:
    """Another process deletes ``old`` and inserts ``new``, of the same size, type and doc,
    into the room it left."""
    fabric.delete(old)
    fabric.insert(new, "", np.float64, data)


def churn(fabric, data: np.ndarray) -> int:
    """Another process fills its node with copies of ``-data`` until nothing more fits:
    memory freed under a view is written over.  Returns how many."""
    n = 0
    while True:
        try:
            fabric.insert(f"filler/{n}", "", np.float64, -data)
        except OutOfSpaceError:
            return n
        n += 1


def replace_and_churn(fabric, data: np.ndarray) -> int:
    replace(fabric, "x", "y", data + 1)
    return churn(fabric, data)


def declaring_late(monkeypatch) -> threading.Event:
    """This process's clients declare their kept views ``DECLARE_LATE`` s after each
    take-back event; the event is set once a declaration is done."""
    original, declared = context._declare_kept_views, threading.Event()

    async def declare_late(*args):
        await asyncio.sleep(DECLARE_LATE)
        await original(*args)
        declared.set()

    monkeypatch.setattr(context, "_declare_kept_views", declare_late)
    return declared


def test_a_kept_view_declared_after_its_variable_was_replaced_leases_nothing_else(
    processes,  # noqa: F811
    monkeypatch,
    tmp_path,
    caplog,
):
    """A client on node A keeps a view of "x" through the crash and declares it late: after
    the restarted scheduler has stopped waiting for it (``SHORT_WAIT``).  Then another
    process deletes "x" and inserts "y" in its very room.  The late declaration must not
    take a lease of "y" (the view is not "y"'s): it is refused and logged, and deleting "y"
    frees its memory at once."""
    declared = declaring_late(monkeypatch)
    monkeypatch.setenv("DASK_DATAFABRIC__KEPT_VIEWS_WAIT", str(SHORT_WAIT))
    log = tmp_path / "scheduler.log"
    data = np.arange(100_000.0)
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        fabric.insert("x", "", np.float64, data)
        view = fabric.get("x")
        assert not view.flags.owndata, "the client maps node A's block"
        pin = pin_of(view)
        lease = pin.lease

        processes.crash_scheduler()
        processes.scheduler_log = str(log)
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: listed(fabric) == ["x"], "x came back")
        ended = "the wait for kept views ends"
        wait_for(lambda: log.read_text().count(ended) == len(NODES), "the take-backs to stop waiting for the client")
        a = worker_of(client)[NODES[0]]
        with caplog.at_level(logging.WARNING, logger="datafabric"):
            client.submit(replace, fabric, "x", "y", data + 1, workers=[a], pure=False).result()
            assert declared.wait(60), "the client never declared its kept views"
        assert listed(fabric) == ["y"]
        [(_, shm_id, offset)] = fabric.get_locations("y")
        assert (shm_id, offset) == (pin.segment.name.lstrip("/"), pin.data_offset), "y is not in x's room"
        assert lease["var_id"] != fabric._ctx().call("info", name="y")["var_id"], "the kept view of x leases y"
        assert "not leased again" in caplog.text, "the client was not told its view was lost"
        fabric.delete("y")
        wait_for(lambda: used(fabric) == 0, f"y is held by the kept view of x (lease {lease})", timeout=10)
        del view
        fabric.shutdown()


def test_a_kept_view_keeps_its_bytes_while_its_variable_is_deleted_before_it_is_declared(processes, monkeypatch):  # noqa: F811
    """As above, but within the take-back's wait (``LONG_WAIT``, longer than ``DECLARE_LATE``):
    "x" is deleted, "y" inserted and node A filled with other variables before the client
    declares its view of "x".  The take-back held x's memory until the declaration, which
    then leases x (deleted, its memory still the view's): the view's bytes never change,
    deleting "y" and the fillers leaves x's memory held, and dropping the view frees it."""
    declared = declaring_late(monkeypatch)
    monkeypatch.setenv("DASK_DATAFABRIC__KEPT_VIEWS_WAIT", str(LONG_WAIT))
    data = np.arange(100_000.0)
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        fabric.insert("x", "", np.float64, data)
        view = fabric.get("x")
        assert not view.flags.owndata, "the client maps node A's block"
        lease = pin_of(view).lease
        alone = used(fabric)

        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected
        wait_for(lambda: listed(fabric) == ["x"], "x came back")
        a = worker_of(client)[NODES[0]]
        filled = client.submit(replace_and_churn, fabric, data, workers=[a], pure=False).result()
        np.testing.assert_array_equal(view, data, err_msg=f"the kept view changed before it was declared ({filled})")
        assert declared.wait(60), "the client never declared its kept views"
        assert lease["holder"] == client.id and lease["var_id"] != fabric._ctx().call("info", name="y")["var_id"]
        fabric.delete_prefix("filler/")
        fabric.delete("y")
        np.testing.assert_array_equal(view, data, err_msg="the kept view changed")
        wait_for(lambda: used(fabric) == alone, f"only x's memory is held: {fabric.status()}", timeout=30)
        del view
        wait_for(lambda: used(fabric) == 0, f"x is still held after its view was dropped: {fabric.status()}")
        fabric.shutdown()
