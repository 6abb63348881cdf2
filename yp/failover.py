"""Tasks pinned to fabric workers that died run on a live worker of the same node.

``fabric.where(name)`` answers worker addresses, for ``client.submit(f, workers=...)``.
An address names one process: when it dies (its nanny starts a new one under another
address), a task restricted to it waits in Dask's ``no-worker`` state for ever.  So when
a task enters ``no-worker`` and **every** address it is restricted to is a fabric worker
that has left, it is restricted instead to the fabric workers of those workers' nodes:
for one node, its resource ``datafabric-node:<node>`` (as ``fabric.submit`` asks for it,
so any later death is survived too, and a worker of that node registering later takes it,
``Membership.schedule_waiting_for``); for several, the live workers of those nodes now.
A restriction naming any address that is alive, or that was never a fabric worker, is
the user's and is left alone.  Nothing changes for a task that is running.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from datafabric.locality import node_resource
from yp.membership import Membership

DEPARTED_KEPT = 4096  # the most recent departures remembered (their nodes)


class Failover:
    def __init__(self, scheduler: Any, members: Membership) -> None:
        self.scheduler = scheduler
        self.members = members
        self.departed: OrderedDict[str, str] = OrderedDict()  # address -> node, of fabric workers that left

    def left(self, address: str) -> None:
        """Before ``Membership.remove`` forgets the worker's node."""
        node = self.members.node_of.get(address)
        if node is not None:
            self.departed[address] = node
            while len(self.departed) > DEPARTED_KEPT:
                self.departed.popitem(last=False)

    def transition(self, key: Any, finish: str) -> None:
        """From Dask's transition hook, inside a transition: the fix runs after it."""
        if finish == "no-worker":
            self.scheduler.loop.add_callback(self._fail_over, key)

    def _fail_over(self, key: Any) -> None:
        ts = self.scheduler.tasks.get(key)
        if ts is None or ts.state != "no-worker" or not ts.worker_restrictions:
            return
        pinned = ts.worker_restrictions
        if any(a in self.scheduler.workers or a not in self.departed for a in pinned):
            return
        nodes = sorted({self.departed[a] for a in pinned})
        if len(nodes) == 1:
            ts.worker_restrictions = None
            ts.resource_restrictions = {**(ts.resource_restrictions or {}), node_resource(nodes[0]): 1}
        else:
            live = self.members.workers_on(set(nodes))
            if not live:
                return  # no worker of any of them now: it waits, as Dask would have it
            ts.worker_restrictions = set(live)
        self.scheduler.transitions({key: "processing"}, stimulus_id=f"datafabric-failover-{time.time()}")
