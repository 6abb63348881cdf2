"""Attacks on the kept-views rounds at cluster level (docs "Views kept through a scheduler
crash"; ``yp/declarations.py``, ``datafabric/context.py``): a second scheduler restart
while a client's declaration to the first restarted scheduler is still being worked
through, so that what the client says about the rounds of the first restarted scheduler
reaches the second one.

Real processes as ``tests/test_restart.py`` runs them (``tests/processes.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client

import datafabric
from datafabric import context
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.test_attack_restart_views import replace_and_churn, used
from tests.test_restart import NODES, listed, pin_of, processes, worker_of  # noqa: F401  (fixture)
from tests.test_restart_kept_views import NODE as KEPT_NODE
from tests.test_restart_kept_views import digest, fill_up, insert_here, quietly
from tests.test_restart_kept_views import processes as kept_processes  # noqa: F401  (fixture)
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 8  # the restarted schedulers' datafabric.kept-views-wait, in seconds
WORKERS_LATE = 6  # seconds after the third scheduler's start its workers are started
declare = context._declare_kept_views  # a client's declaration, called here by the test


def incarnation(dask_scheduler) -> tuple[int, int, int, float]:
    """(first variable id, the latest round opened, rounds still open, monotonic start)."""
    yp = dask_scheduler.plugins[SCHEDULER_PLUGIN]
    declarations = yp.members.declarations
    return yp.directory.first_id, declarations.last, len(declarations.rounds), declarations.started


def test_a_declaration_meant_for_an_earlier_incarnation_ends_no_round_of_this_one(processes, monkeypatch):  # noqa: F811
    """A client keeps a view of "x" through a crash and declares it to the restarted
    scheduler (its lease there).  That scheduler dies too.  A declaration answering the
    first restarted scheduler's took-back event, worked through late (its event handled as
    the second crash came, its ``declared`` reaching the scheduler now on the same address),
    must not count as the client's declaration to the second restarted scheduler, whose
    rounds hold "x" for the client: then "x" deleted and node A filled leave the view's
    bytes alone, and the client's own declaration, in time, keeps them until it drops it."""
    monkeypatch.setenv("DASK_DATAFABRIC__KEPT_VIEWS_WAIT", str(WAIT))
    data = np.arange(100_000.0)
    with dask.config.set({"datafabric.node-id": NODES[0]}), Client(processes.address, timeout=90) as client:
        client.wait_for_workers(2)
        fabric = datafabric.start(client, mb=64)
        fabric_id = uuid.UUID(fabric.fabric_id)
        fabric.insert("x", "", np.float64, data)
        view = fabric.get("x")
        assert not view.flags.owndata, "the client maps node A's block"
        lease = pin_of(view).lease

        processes.crash_scheduler()
        processes.start()
        client.wait_for_workers(2)  # the same client, reconnected: it declares x to this incarnation
        first_id, *_ = client.run_on_scheduler(incarnation)
        wait_for(lambda: lease["var_id"] >= first_id, "the client's declaration to the second scheduler")
        stale_round = wait_for(
            lambda: (last := client.run_on_scheduler(incarnation)[1]) == len(NODES) and last, "both take-backs"
        )

        events: list = []  # took-back events of the third scheduler: the test declares for the client
        monkeypatch.setattr(context, "_declare_kept_views", lambda *args: events.append(args))
        processes.crash_scheduler()
        processes.start_scheduler()
        third_id, _, _, started = wait_for(
            lambda: (i := quietly(lambda: client.run_on_scheduler(incarnation), None)) and i[0] != first_id and i,
            "the third scheduler",
        )
        time.sleep(max(0.0, started + WORKERS_LATE - time.monotonic()))  # late take-backs, late deadlines
        processes.start_workers()
        client.wait_for_workers(2)
        wait_for(lambda: listed(fabric) == ["x"], "x came back")
        open_rounds = client.run_on_scheduler(incarnation)[2]
        assert open_rounds > 0, "the third scheduler's rounds ended before the test could look"
        # Its rounds may end early once WAIT s have passed since it started, and every client
        # they wait for has declared: the stale declaration comes then, before their deadlines.
        time.sleep(max(0.0, started + WAIT + 0.3 - time.monotonic()))
        client.sync(declare, client, fabric_id, first_id, stale_round)
        rounds_left = client.run_on_scheduler(incarnation)[2]
        a = worker_of(client)[NODES[0]]
        client.submit(replace_and_churn, fabric, data, workers=[a], pure=False).result()
        changed = int(np.count_nonzero(view != data))
        mine = [e for e in events if e[2] == third_id]
        assert mine, f"no took-back event of the third scheduler reached the client: {events}"
        client.sync(declare, *mine[-1])
        wrong = [f"{changed} values under the kept view changed"] * bool(changed)
        wrong += ["a declaration meant for the second scheduler ended the third one's rounds"] * (not rounds_left)
        if wrong:  # the fixture removes the fabric's segments: this process must map none of them
            del view
            fabric.shutdown()
            pytest.fail("; ".join(wrong))
        fabric.delete_prefix("filler/")
        fabric.delete("y")
        np.testing.assert_array_equal(view, data, err_msg="the kept view changed")
        del view
        wait_for(lambda: used(fabric) == 0, f"memory still held once the view was dropped: {fabric.status()}")
        fabric.shutdown()


# -- a task's batch of views, a client that never comes back, a delete right after ------
HOLDER_SCRIPT = """
import sys, time, numpy as np, dask
from distributed import Client
import datafabric
dask.config.set({"datafabric.node-id": sys.argv[2]})
with Client(sys.argv[1], timeout=60) as client:
    fabric = datafabric.connect(client)
    view = fabric.get("gone-client")
    assert not view.flags.owndata
    open(sys.argv[3], "w").write("holding")
    time.sleep(600)
"""


def hold_batch(fabric, names, started, stop, out):
    """A task: one get_many of ``names`` (duplicates included: local leases, one lock), the
    digests seen until told to stop written to ``out``."""
    views = fabric.get_many(names)
    seen = {n: set() for n in names}
    with open(started, "w") as f:
        f.write("holding")
    deadline = time.time() + 180
    while not os.path.exists(stop) and time.time() < deadline:
        for n, v in zip(names, views, strict=True):
            seen[n].add(digest(v))
        time.sleep(0.05)
    with open(out, "w") as f:
        json.dump({n: sorted(s) for n, s in seen.items()}, f)


def test_a_task_s_batch_kept_through_a_restart_while_a_client_never_comes_back(kept_processes, tmp_path):  # noqa: F811
    """A task holds one get_many of three variables (one of them twice, one deleted while
    read); another client process holds a view of a fourth, deleted too, and is SIGKILLed
    while the scheduler is down: it never comes back.  As soon as the restarted scheduler
    lists the names, they are deleted, the block defragmented and filled.  The task's
    checksums never change, and once the old worker process is gone and the rounds are over,
    every byte comes back."""
    rng = np.random.default_rng(5)
    data = {n: rng.random(50_000) for n in ("gap", "a", "b", "doomed", "gone-client")}
    names = ["a", "b", "a", "doomed"]
    expected = {n: digest(data[n]) for n in names}
    started, stop, out, ready = (str(tmp_path / n) for n in ("started", "stop", "out.json", "ready"))
    with Client(kept_processes.address, timeout=90) as client:
        client.wait_for_workers(1)
        fabric = datafabric.start(client, mb=32)
        client.submit(insert_here, fabric, data).result()
        fabric.delete("gap")  # a hole first: a compaction would move anything unleased
        running = client.submit(hold_batch, fabric, names, started, stop, out, pure=False)
        wait_for(lambda: os.path.exists(started), "the task to hold its batch")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, kept_processes.address, KEPT_NODE, ready], start_new_session=True
        )
        try:
            wait_for(lambda: os.path.exists(ready), "the other client to hold its view")
            fabric.delete("doomed")
            fabric.delete("gone-client")  # both deleted while read: their headers say DELETED

            closing = kept_processes.lose_scheduler()
            del running
            holder.kill()  # it never comes back
            holder.wait()
            kept_processes.start()
            wait_for(lambda: set(quietly(fabric.get_list, [])) == {"a", "b"}, "the block taken back")
            fabric.delete("a")
            fabric.defragment()
            assert client.submit(fill_up, fabric, pure=False).result() > 0
            with open(stop, "w") as f:
                f.write("stop")
            for proc in closing:
                proc.wait(60)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        with open(out) as f:
            seen = json.load(f)
        assert seen == {n: [expected[n]] for n in expected}, "the bytes under the task's views changed"
        fabric.delete_prefix("filler/")
        fabric.delete("b")
        wait_for(lambda: all(b["used"] == 0 for b in fabric.status()), f"memory still held: {fabric.status()}")
        fabric.shutdown()
