"""A worker process that lost its scheduler while its tasks hold fabric views declares
them to the scheduler restarted at the same address.

Dask closes a worker whose scheduler connection breaks, but the close waits for the tasks
it is running: they go on reading their views for as long as they run, while the
restarted scheduler's YellowPages, knowing no lease, takes the blocks back and may delete,
compact or evict under them.  So, from the plugin's teardown, a thread of this process
connects to the scheduler's address as a Dask client, again and again until it answers,
and declares every view alive here, local leases and ordinary ones alike, by location
(``yp/kept_views.py``): the leases are that client's, so they end when it leaves, which
it does once the last view is gone or with this process.  A scheduler that dies again
takes those leases with it: the next incarnation is declared to afresh, by a new client.
Only a durable fabric (its id comes from the scheduler's address) is declared: any other
did not survive its scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any

from datafabric.messages import KeptView
from datafabric.protocol import EVENT_TOPIC, raise_if_refused
from datafabric.views import LocalState

logger = logging.getLogger("datafabric.worker")

CONNECT_TIMEOUT = 1.0  # seconds per attempt: short, so that a scheduler back is found soon
HOLD_POLL = 0.5  # seconds between looks at whether any view is left


def kept_views(state: LocalState) -> list[KeptView]:
    return [
        {
            "node": pin.node,
            "shm_id": pin.segment.name.lstrip("/"),
            "offset": pin.data_offset,
            "extent_id": pin.extent_id,
        }
        for pin in state.pins_leased_before(sys.maxsize)
    ]


def declare_when_back(scheduler_address: str, fabric_id: str, state: LocalState) -> threading.Thread | None:
    """Start declaring this process's views of a durable fabric to the restarted scheduler;
    None if there is nothing to declare."""
    from yp.plugin import durable_fabric_id

    if fabric_id != durable_fabric_id(scheduler_address) or not kept_views(state):
        return None
    thread = threading.Thread(
        target=asyncio.run, args=(_declare(scheduler_address, state),), name="datafabric-kept-views", daemon=True
    )
    thread.start()
    return thread


async def _declare(address: str, state: LocalState) -> None:
    """Declare to each scheduler incarnation in turn while any view lives: one that dies
    too (during the declaration or after) takes its leases with it, so the next one is
    told again, by a new client (the old one's leases end with it wherever they are)."""
    while kept_views(state):
        client = await _connect(address, state)
        if client is None:
            return
        async with client:  # the leases are its own: they end when it closes
            # A durable fabric's YellowPages subscribes every client to its events; this one
            # needs none of them (its leases are by location), but without a handler Dask logs
            # an error for each.
            client.subscribe_topic(EVENT_TOPIC, _ignore)
            stream = client.scheduler_comm  # replaced if the client reconnects to a new incarnation
            views = kept_views(state)
            try:
                counts = raise_if_refused(await client.scheduler.datafabric_declare_kept(views=views, holder=client.id))
            except Exception as exc:
                logger.warning("could not declare %d views kept through the scheduler's restart: %r", len(views), exc)
                continue
            if counts["lost"]:
                logger.warning(
                    "%d views kept through the scheduler's restart were declared after their memory was freed or "
                    "moved: they hold no lease, and their bytes may change",
                    counts["lost"],
                )
            logger.info("declared %d views kept through the scheduler's restart: %s", len(views), counts)
            while kept_views(state) and client.status == "running" and client.scheduler_comm is stream:
                await asyncio.sleep(HOLD_POLL)


async def _connect(address: str, state: LocalState) -> Any:
    """A Dask client of the scheduler at ``address``, attempt after attempt; None once no
    view is left to declare."""
    from distributed import Client

    while kept_views(state):
        try:
            return await Client(
                address, asynchronous=True, timeout=CONNECT_TIMEOUT, set_as_default=False, name="datafabric-kept-views"
            )
        except (TimeoutError, OSError):
            continue
    return None


def _ignore(event: tuple) -> None:
    return None
