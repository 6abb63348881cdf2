"""Attacks on the kept-views rounds at cluster level (docs "Views kept through a scheduler
crash"; ``yp/declarations.py``, ``datafabric/context.py``): a second scheduler restart
while a client's declaration to the first restarted scheduler is still being worked
through, so that what the client says about the rounds of the first restarted scheduler
reaches the second one.

Real processes as ``tests/test_restart.py`` runs them (``tests/processes.py``).
"""

from __future__ import annotations

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
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 8  # the restarted schedulers' datafabric.kept-views-wait, in seconds
WORKERS_LATE = 5  # seconds after the third scheduler's start its workers are started
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
        time.sleep(WORKERS_LATE)  # the take-backs come late: their rounds' deadlines with them
        processes.start_workers()
        client.wait_for_workers(2)
        wait_for(lambda: listed(fabric) == ["x"], "x came back")
        third_id, _, open_rounds, started = client.run_on_scheduler(incarnation)
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
