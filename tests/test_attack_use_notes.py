"""Attacks on when a worker's use notes of local reads reach the YellowPages
(``worker_plugin/use_reports.py``, the plugin's ``transition``): docs/protocols.md, "Uses
reach the eviction order".  The second's periodic flush is stopped on the worker that
reads wherever the claim is "when the task ends", so a note that waits for it shows as
never arriving.  Attacked: two threads noting at once, each way a task stops running
(returns, errs, secedes, cancelled while it runs), a worker closing with notes due, and
the eviction order a finished task's read must set."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import cloudpickle
import numpy as np
import pytest
from distributed import Client, secede

import datafabric
from tests.blocks import shm_block
from tests.conftest import local_cluster
from tests.grants import setup
from tests.test_local_reads import wait_published
from tests.test_nodes import insert_here, nfabric, node_workers, nodes_client  # noqa: F401  (fixtures)
from tests.waiting import wait_for
from worker_plugin.plugin import FabricWorkerPlugin
from worker_plugin.use_reports import UseReports

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
YP = "datafabric-yellowpages"


class _StallingLater:
    """``later`` for a ``LocalReads``: the thread that schedules the first report waits
    there (until ``release`` or half a second), as a thread may be preempted there."""

    def __init__(self) -> None:
        self.due: list = []
        self.stalled = threading.Event()
        self.release = threading.Event()

    def append(self, report) -> None:
        self.stalled.set()
        self.release.wait(0.5)
        self.due.append(report)


def test_a_note_made_while_the_first_is_being_scheduled_goes_with_its_task_s_end():
    """Thread 1 notes x first and is about to schedule the report; thread 2 notes y (not
    the first) and its task ends: the end must find a report due that carries y.  Before,
    the report was scheduled after the lock was let go, and y's task ended with none due."""
    with shm_block(MiB) as segment:
        sent: list = []
        later = _StallingLater()
        reads, entry = setup(segment, sent, later)
        reads.publish([entry, {**entry, "var_id": 8, "name": "y", "data_offset": 8192}])
        views: list = []
        first = threading.Thread(target=lambda: views.append(reads.pin("x").view()))
        first.start()
        assert later.stalled.wait(10)
        second = threading.Thread(target=lambda: views.append(reads.pin("y").view()))
        second.start()
        second.join(10)
        assert not second.is_alive()
        for report in later.due:  # y's task ends: the plugin runs the reports due
            report(sent.append)
        at_its_end = list(sent)
        later.release.set()
        first.join(10)
        assert at_its_end == [{"op": "datafabric_used", "var_ids": [7, 8]}]
        views.clear()  # the leases end here, before the block goes


@pytest.mark.parametrize(
    ("start", "finish"),
    [
        ("executing", "memory"),
        ("executing", "error"),
        ("executing", "long-running"),
        ("long-running", "memory"),
        ("executing", "released"),  # cancelled as it runs: the task runs on
        ("cancelled", "released"),  # and stops
        ("cancelled", "error"),
        ("resumed", "memory"),  # its result is sent: a task may run on it next
    ],
)
def test_every_transition_of_a_task_that_stops_running_sends_the_notes_due(start, finish):
    assert notes_sent_at(start, finish) == ["notes"]


@pytest.mark.parametrize(("start", "finish"), [("waiting", "ready"), ("ready", "executing"), ("memory", "released")])
def test_a_transition_of_a_task_not_running_sends_nothing(start, finish):
    assert notes_sent_at(start, finish) == []


def notes_sent_at(start: str, finish: str) -> list:
    """What the plugin's ``transition`` hook sends, with notes due, for this transition."""
    sent: list = []
    worker = SimpleNamespace(batched_stream=SimpleNamespace(send=sent.append), periodic_callbacks={})
    reports = UseReports(worker, 3600, "uses")
    try:
        reports.later(lambda send: send("notes"))
        FabricWorkerPlugin.transition(SimpleNamespace(reports=reports), "k", start, finish)
        return list(sent)
    finally:
        reports._flush.stop()


def flush(on: bool, dask_worker=None) -> None:
    """On a worker (``client.run``): start or stop the second's periodic flush of use notes."""
    periodic = dask_worker.plugins["datafabric"].reports._flush
    if on:
        periodic.start()
    else:
        periodic.stop()


def last_used(name, dask_scheduler=None) -> float:
    return dask_scheduler.plugins[YP].directory.lookup(name).last_used


def worker_state(key, dask_worker=None) -> str | None:
    ts = dask_worker.state.tasks.get(key)
    return None if ts is None else ts.state


def read_when(fabric, name, started, go) -> float:
    started.touch()
    while not go.exists():
        time.sleep(0.01)
    return float(fabric.get(name).sum())


def test_a_task_cancelled_while_it_runs_sends_its_notes_as_it_stops(client, fabric, tmp_path):
    """Cancelled while running, a task is "cancelled" on its worker until its thread
    returns; it read after the cancel, so its end (cancelled -> released) must send the
    note, as any task's end does."""
    fabric.insert("notes/c", "", np.float64, np.ones(1000))
    worker = sorted(client.scheduler_info()["workers"])[0]
    wait_published(client, worker, ["notes/c"])
    started, go = tmp_path / "started", tmp_path / "go"
    client.run(flush, False, workers=[worker])
    try:
        future = client.submit(read_when, fabric, "notes/c", started, go, workers=[worker], pure=False)
        wait_for(started.exists, "the task to start")
        key = future.key
        future.cancel()
        wait_for(lambda: client.run(worker_state, key, workers=[worker])[worker] == "cancelled", "the cancel")
        before = client.run_on_scheduler(last_used, "notes/c")
        go.touch()
        wait_for(lambda: client.run(worker_state, key, workers=[worker])[worker] is None, "the task to end")
        wait_for(lambda: client.run_on_scheduler(last_used, "notes/c") > before, "the note", timeout=5)
    finally:
        go.touch()
        client.run(flush, True, workers=[worker])
        fabric.delete("notes/c")


def read_in_a_thread(fabric, name) -> float:
    """In a worker, outside any task: a read on a thread of its own."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(float(fabric.get(name).sum())))
    thread.start()
    thread.join(30)
    return out[0]


def test_reads_outside_tasks_reach_the_yellowpages_within_the_second_s_flush(client, fabric):
    """No task ends after a read on a worker's own thread or in ``client.run``: the
    periodic flush sends the note (a second at most; five allowed for a loaded machine)."""
    fabric.insert("notes/o", "", np.float64, np.ones(1000))
    worker = sorted(client.scheduler_info()["workers"])[0]
    wait_published(client, worker, ["notes/o"])
    try:
        before = client.run_on_scheduler(last_used, "notes/o")
        assert client.run(read_in_a_thread, fabric, "notes/o", workers=[worker])[worker] == 1000
        wait_for(lambda: client.run_on_scheduler(last_used, "notes/o") > before, "the note", timeout=5)
    finally:
        fabric.delete("notes/o")


def test_a_worker_closing_with_notes_due_sends_them():
    """A read outside tasks waits for the second's flush; a worker closing before it must
    send the note at its teardown, not drop it."""
    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        try:
            fabric.insert("notes/w", "", np.float64, np.ones(1000))
            closing = sorted(client.scheduler_info()["workers"])[1]
            wait_published(client, closing, ["notes/w"])
            client.run(flush, False, workers=[closing])
            before = client.run_on_scheduler(last_used, "notes/w")
            assert client.run(read_in_a_thread, fabric, "notes/w", workers=[closing])[closing] == 1000
            client.retire_workers([closing], close_workers=True)
            wait_for(lambda: client.run_on_scheduler(last_used, "notes/w") > before, "the note", timeout=5)
        finally:
            fabric.shutdown()


def read_then(fabric, name, how) -> float:
    total = float(fabric.get(name).sum())
    if how == "secedes":
        secede()
        time.sleep(0.05)
    if how == "errs":
        raise RuntimeError("after the read")
    return total


@pytest.mark.parametrize("how", ["returns", "errs", "secedes"])
def test_a_replica_read_by_a_finished_task_is_evicted_after_the_unread_ones(nodes_client, nfabric, how):  # noqa: F811
    """e0, e1, e2 on node-a, replicated onto node-b; a task on node-b reads e0's replica
    locally and ends (returns, errs, or after seceding); the next task there needs room,
    so node-b drops replicas least recently used first: e1, never e0."""
    per_node = node_workers(nodes_client)
    a0, (b0, b1) = per_node["node-a"][0], per_node["node-b"]
    names = [f"notes/e{i}" for i in range(3)]
    for i, name in enumerate(names):
        nodes_client.submit(insert_here, nfabric, name, np.full(14 * MiB // 8, float(i)), workers=[a0]).result()
        nfabric.replicate(name, ["node-b"])
    wait_published(nodes_client, b1, names)
    nodes_client.run(flush, False, workers=[b1])
    try:
        read = nodes_client.submit(read_then, nfabric, names[0], how, workers=[b1], pure=False)
        if how == "errs":
            with pytest.raises(RuntimeError, match="after the read"):
                read.result()
        else:
            assert read.result() == 0.0
        nodes_client.submit(insert_here, nfabric, "notes/big", np.zeros(18 * MiB // 8), workers=[b0]).result()
        copies = {i: [loc[0] for loc in nfabric.get_locations(name)] for i, name in enumerate(names)}
        assert copies[0] == ["node-a", "node-b"], copies  # read last: it stays
        assert copies[1] == ["node-a"], copies  # the least recently used went first
    finally:
        nodes_client.run(flush, True, workers=[b1])
        for name in [*names, "notes/big"]:
            nfabric.delete(name)
