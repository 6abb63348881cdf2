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
from datafabric.protocol import EVENT_TOPIC, SCHEDULER_PLUGIN
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


class TellAtStreamStart(SchedulerPlugin):
    """Sends the take-back event straight to each registering client (``report(...,
    client=...)``, as a take-back's round does every second to the clients it waits for)
    in the very loop step after it registers."""

    name = "test-tell-at-stream-start"

    def add_client(self, scheduler, client):
        scheduler.loop.add_callback(scheduler.plugins[SCHEDULER_PLUGIN].members.declarations.tell, client)


class CutAtStreamStart(SchedulerPlugin):
    """Cuts the new stream of the clients in ``cuts`` (client id -> how many more times;
    -1: until told otherwise) in the loop step after they register, before its first
    batch: a client that breaks again before it is put back on the topic."""

    name = "test-cut-at-stream-start"

    def __init__(self):
        self.cuts = {}

    def add_client(self, scheduler, client):
        if self.cuts.get(client, 0) != 0:
            self.cuts[client] -= 1
            scheduler.loop.add_callback(_cut, client, dask_scheduler=scheduler)


def _install(cls=EventAtStreamStart, dask_scheduler=None):
    dask_scheduler.plugins[cls.name] = cls()


def _uninstall(cls=EventAtStreamStart, dask_scheduler=None):
    dask_scheduler.plugins.pop(cls.name, None)


def _cut_at_start(client_id, times, dask_scheduler=None):
    dask_scheduler.plugins[CutAtStreamStart.name].cuts[client_id] = times


def _owed(dask_scheduler=None):
    return dict(dask_scheduler.plugins[SCHEDULER_PLUGIN].client_events._owed)


def _state(client_id, dask_scheduler=None):
    topics = dask_scheduler._broker._topics
    return client_id in dask_scheduler.client_comms, client_id in topics[EVENT_TOPIC].subscribers


def _cut(client_id, dask_scheduler=None):
    if (comm := dask_scheduler.client_comms.get(client_id)) is not None:
        comm.abort()


def _subscribed_client(client):
    """Another client of the cluster, on the fabric's topic."""
    other = Client(client.scheduler.address)
    datafabric.connect(other).get_list()  # its first call: it subscribes to the fabric's events
    wait_for(lambda: client.run_on_scheduler(_state, client_id=other.id) == (True, True), "the subscription")
    return other


def _running(client) -> bool:
    return client.status == "running" and client.scheduler_comm is not None and not client.scheduler_comm.closed()


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
                wait_for(lambda: _running(other), "a reconnection", 30)
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


def test_a_client_told_directly_as_it_reconnects_gets_its_stream_back(client, fabric):
    """What the fabric sends one client straight (a take-back's event) waits for its
    stream's first batch too."""
    with _subscribed_client(client) as other:
        client.run_on_scheduler(_install, cls=TellAtStreamStart)
        try:
            for cut in range(3):
                client.run_on_scheduler(_cut, client_id=other.id)
                wait_for(lambda: _running(other), f"a reconnection (cut {cut})", 30)
                wait_for(
                    lambda: client.run_on_scheduler(_state, client_id=other.id) == (True, True),
                    f"the client back on its stream and the topic (cut {cut})",
                )
        finally:
            client.run_on_scheduler(_uninstall, cls=TellAtStreamStart)
        assert other.status == "running"


def test_a_client_cut_again_before_it_is_back_on_the_topic_ends_on_it_and_owes_nothing(client, fabric):
    """Cut five times in a row before its stream's first batch, the client ends on the
    topic (and hears a delete), and nothing is kept for it."""
    with _subscribed_client(client) as other:
        theirs = datafabric.connect(other)
        fabric.insert("ce/again", "", np.float64, np.arange(4.0))
        assert theirs.get("ce/again")[0] == 0.0
        client.run_on_scheduler(_install, cls=CutAtStreamStart)
        try:
            client.run_on_scheduler(_cut_at_start, client_id=other.id, times=5)
            client.run_on_scheduler(_cut, client_id=other.id)
            wait_for(
                lambda: (
                    client.run_on_scheduler(_state, client_id=other.id) == (True, True)
                    and other.id not in client.run_on_scheduler(_owed)
                ),
                "the client back on its stream and the topic after five cuts at its start",
                60,
            )
            assert (
                client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[CutAtStreamStart.name].cuts)[
                    other.id
                ]
                == 0
            )  # every cut happened
        finally:
            client.run_on_scheduler(_uninstall, cls=CutAtStreamStart)
        fabric.delete("ce/again")
        fabric.insert("ce/again", "", np.float64, np.full(4, 5.0))
        wait_for(lambda: theirs.get("ce/again")[0] == 5.0, "the invalidation to reach the client")
        fabric.delete("ce/again")


def test_a_client_that_leaves_for_good_while_taken_off_the_topic_leaves_nothing_owed(client, fabric):
    other = _subscribed_client(client)
    client.run_on_scheduler(_install, cls=CutAtStreamStart)
    try:
        client.run_on_scheduler(_cut_at_start, client_id=other.id, times=-1)  # never gets a stream again
        client.run_on_scheduler(_cut, client_id=other.id)
        wait_for(lambda: other.id in client.run_on_scheduler(_owed), "the client taken off the topic as it registers")
        other.close()
        wait_for(lambda: other.id not in client.run_on_scheduler(_owed), "the departed client forgotten", 30)
    finally:
        client.run_on_scheduler(_uninstall, cls=CutAtStreamStart)
