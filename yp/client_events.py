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
gone, with a ``datafabric_resync`` event: it forgets every view it cached, since the
invalidations published while it was away reached nobody.  A client that outlived a
scheduler restart is put on the topic the same way.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from datafabric.protocol import EVENT_TOPIC

DELAY = 0.5  # seconds: the stream's first batch goes out within a few ms of its start


class ClientEvents:
    def __init__(self, scheduler: Any, fabric_id: str) -> None:
        self.scheduler = scheduler
        self.fabric_id = fabric_id
        self._owed: dict[str, int] = {}  # clients taken off the topic -> the registration to put back
        self._serials = itertools.count()

    def registering(self, client: str, durable: bool, then: Callable[[str], None] | None = None) -> None:
        """In Dask's ``add_client``, before the client's stream exists.  ``durable``: every
        client is put on the topic (it may have outlived a scheduler restart); ``then``
        runs once it is."""
        if not (durable or client in self._owed or self._subscribed(client)):
            return  # a new client subscribes itself once its stream runs
        self.scheduler.unsubscribe_topic(EVENT_TOPIC, client)
        serial = self._owed[client] = next(self._serials)
        self.scheduler.loop.call_later(DELAY, self._resume, client, serial, then)

    def _resume(self, client: str, serial: int, then: Callable[[str], None] | None) -> None:
        if self._owed.get(client) != serial or client not in self.scheduler.client_comms:
            return  # registered again since (that registration puts it back), or away again
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
