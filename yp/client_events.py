"""When a client hears the fabric's events: never in its stream's first batch.

Clients hear of deleted names and unlinked blocks on a Dask event topic (``EVENT_TOPIC``).
Dask keeps a client's subscriptions when its stream breaks, and the client reconnects under
its id; the first batch on the new stream must hold ``stream-start`` alone: Dask's client
asserts it and, when it does not, gives up reconnecting for good (cut off, it is counted
gone, and its seals are refused).  An event published in the instant between the new
stream's start and its first write joined that batch (under a churn of deletes, one
reconnection in a few hundred).

So a client that registers while subscribed (reconnecting) is taken off the topic before
Dask makes its stream (``add_client`` runs first), and put back once that first batch has
gone (``stream_started``: Dask's ``BatchedSend`` counts a batch as it takes it from the
buffer, so what is sent after that goes in a later one), with a ``datafabric_resync``
event: it forgets every view it cached, since the invalidations published while it was
away reached nobody.  A client that outlived a scheduler restart is put on the topic the
same way.  What the fabric sends a client directly (``yp/declarations.py``) waits for the
same condition.  A client that leaves again before it is put back is put back on the topic
once its registration is gone, as Dask would have kept it: its next registration takes it
off again, and nothing is kept for a client that never comes back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from datafabric.protocol import EVENT_TOPIC

FIRST_LOOK = 0.005  # seconds: the stream's first batch goes out within a loop step or two
LONGEST_LOOK = 0.5  # between looks at a stream that has not started


def stream_started(scheduler: Any, client: str) -> bool:
    """Whether the client's stream is open and its first batch (``stream-start`` alone)
    has gone: a message sent now goes in a later batch."""
    comm = scheduler.client_comms.get(client)
    return comm is not None and not comm.closed() and comm.batch_count > 0


class ClientEvents:
    def __init__(self, scheduler: Any, fabric_id: str) -> None:
        self.scheduler = scheduler
        self.fabric_id = fabric_id
        self._owed: dict[str, int] = {}  # registered clients taken off the topic -> that registration
        self._serials = itertools.count()

    def registering(self, client: str, durable: bool, then: Callable[[str], None] | None = None) -> None:
        """In Dask's ``add_client``, before the client's stream exists.  ``durable``: every
        client is put on the topic (it may have outlived a scheduler restart); ``then``
        runs once it is."""
        if not (durable or client in self._owed or self._subscribed(client)):
            return  # a new client subscribes itself once its stream runs
        self.scheduler.unsubscribe_topic(EVENT_TOPIC, client)
        serial = self._owed[client] = next(self._serials)
        self.scheduler.loop.call_later(FIRST_LOOK, self._resume, client, serial, then, FIRST_LOOK)

    def _resume(self, client: str, serial: int, then: Callable[[str], None] | None, wait: float) -> None:
        if self._owed.get(client) != serial:
            return  # left since (put back), or registered again (that registration puts it back)
        if not stream_started(self.scheduler, client):
            if client in self.scheduler.clients or client in self.scheduler.client_comms:
                wait = min(2 * wait, LONGEST_LOOK)  # its stream is starting (or Dask lost its comm)
                self.scheduler.loop.call_later(wait, self._resume, client, serial, then, wait)
            else:  # left before its stream started: back on the topic, as Dask keeps a leaving client
                del self._owed[client]
                self.scheduler.subscribe_topic(EVENT_TOPIC, client)
            return
        del self._owed[client]
        self.scheduler.subscribe_topic(EVENT_TOPIC, client)
        event = (time.time(), {"op": "datafabric_resync", "fabric_id": self.fabric_id})
        self.scheduler.report({"op": "event", "topic": EVENT_TOPIC, "event": event}, client=client)
        if then is not None:
            then(client)

    def _subscribed(self, client: str) -> bool:
        """Dask has no public question for it: its broker's subscribers of the topic."""
        topics = getattr(getattr(self.scheduler, "_broker", None), "_topics", {})
        return EVENT_TOPIC in topics and client in topics[EVENT_TOPIC].subscribers
