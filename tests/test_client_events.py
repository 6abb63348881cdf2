"""A client reconnecting under its id gets its stream back, however many fabric events are
published as it does, and hears them again once its stream runs (``yp/client_events.py``).

Dask's client gives up reconnecting for good when the first batch on its new stream holds
anything beside ``stream-start``; the fabric's events (an invalidation per delete) went to
a reconnecting client as soon as Dask made its stream, and one landing in that instant
cut the client off: it was counted gone and its seal refused."""

from __future__ import annotations

import numpy as np
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

import datafabric
from datafabric.protocol import EVENT_TOPIC
from datafabric.views import LocalState
from tests.waiting import wait_for


class EventAtStreamStart(SchedulerPlugin):
    """Publishes a fabric event in the very loop step after each client registers, just as
    Dask has queued "stream-start" on the client's new stream and before that is written:
    a delete's invalidation at the worst moment, every time."""

    name = "test-event-at-stream-start"

    async def start(self, scheduler):
        self.scheduler = scheduler

    def add_client(self, scheduler, client):
        scheduler.loop.add_callback(scheduler.log_event, EVENT_TOPIC, {"op": "test-noise"})


def _install(dask_scheduler=None):
    dask_scheduler.plugins[EventAtStreamStart.name] = plugin = EventAtStreamStart()
    plugin.scheduler = dask_scheduler


def _uninstall(dask_scheduler=None):
    dask_scheduler.plugins.pop(EventAtStreamStart.name, None)


def _state(client_id, dask_scheduler=None):
    topics = dask_scheduler._broker._topics
    return client_id in dask_scheduler.client_comms, client_id in topics[EVENT_TOPIC].subscribers


def _cut(client_id, dask_scheduler=None):
    dask_scheduler.client_comms[client_id].abort()


def test_a_client_reconnecting_amid_events_gets_its_stream_back_and_hears_them_again(client, fabric):
    with Client(client.scheduler.address) as other:
        theirs = datafabric.connect(other)
        theirs.get_list()  # its first call: it subscribes to the fabric's events
        wait_for(lambda: client.run_on_scheduler(_state, client_id=other.id) == (True, True), "the subscription")
        fabric.insert("ce/x", "", np.float64, np.arange(4.0))
        assert theirs.get("ce/x")[3] == 3.0
        client.run_on_scheduler(_install)
        try:
            for cut in range(3):
                client.run_on_scheduler(_cut, client_id=other.id)
                wait_for(
                    lambda: other.status == "running" and other.scheduler_comm.comm is not None, "a reconnection", 30
                )
                wait_for(
                    lambda: client.run_on_scheduler(_state, client_id=other.id) == (True, True),
                    f"the client back on its stream and the topic (cut {cut})",
                )
        finally:
            client.run_on_scheduler(_uninstall)
        # it hears the fabric's events again: a delete reaches its cache
        fabric.delete("ce/x")
        fabric.insert("ce/x", "", np.float64, np.full(4, 7.0))
        wait_for(lambda: theirs.get("ce/x")[0] == 7.0, "the invalidation to reach the other client")
        fabric.delete("ce/x")


def test_a_resync_forgets_every_cached_view_of_its_fabric_only(monkeypatch):
    """Back on the topic, a client cannot know which invalidations it missed."""
    from datafabric import context

    ours = LocalState("00000000-0000-0000-0000-000000000001")
    others = LocalState("00000000-0000-0000-0000-000000000002")
    for state in (ours, others):
        state._pins.update({"a": lambda: None, "b/c": lambda: None})
    epoch = ours.epoch
    monkeypatch.setattr(context, "all_states", lambda: [ours, others])
    context._on_event(None, (0.0, {"op": "datafabric_resync", "fabric_id": str(ours.fabric_id)}))
    assert dict(ours._pins) == {} and ours.epoch > epoch  # a get under way when it came caches nothing
    assert set(others._pins) == {"a", "b/c"}
