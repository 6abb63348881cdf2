"""The wait after each take-back for the views that processes kept through the crash.

A restarted YellowPages knows no lease: the processes that outlived the crash (clients that
reconnect, worker processes still running tasks) tell it, by location, which views they
kept (``datafabric/context.py``, ``worker_plugin/survivors.py``, ``yp/kept_views.py``).
Until they have, nothing may free or move the memory under those views.  So every take-back
opens a **round**: a lease, held by a holder of its own (``kept-views-wait-<n>``), on every
variable of the blocks it took back, visible or not (extents deleted while read, reserved
ones, sealed ones whose name another type took: deleted variables until the round ends).
Every rule that honours leases honours it: a delete keeps the memory (marked DELETED), a
compaction does not move those copies, an eviction does not drop them.

With ``W`` = ``datafabric.kept-views-wait`` seconds, a round ends ``W`` s after its take-back
at the latest (logged, naming the clients that did not declare), and earlier only once both

- ``W`` s have passed since this YellowPages started: the processes that outlived the crash
  reconnect soon after the scheduler is back, often after the workers' take-backs, and no
  list of them survives the crash; and
- every client connected when the round opened, or connecting while it is open, has
  declared: a client by ``declared`` once its views are leased again (one declaration
  answers every round up to the one it names, of the incarnation it names: round numbers
  start again in each, and a client's declaration answering an earlier incarnation's event
  may reach this one, on the same address, late), a worker process's client by its one
  ``declare_kept`` (which covers every block, back or not), or has left.

Its leases then end as any lease does: what nobody else leases is freed.  While it waits, the
event is sent again every second to the clients it waits for (a client subscribes to the
fabric's events only once it uses the fabric; one that never does is waited for until ``W``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask

from datafabric.errors import InvalidArgumentError
from datafabric.protocol import EVENT_TOPIC
from yp.client_events import stream_started
from yp.directory import Directory
from yp.records import Variable

if TYPE_CHECKING:
    from yp.owners import Owners

logger = logging.getLogger("datafabric.yp")

WAIT_KEY = "datafabric.kept-views-wait"  # seconds a take-back's round waits for declarations at most
DEFAULT_WAIT = 10.0
TELL_AGAIN = 1.0  # seconds between the events sent to clients that have not declared yet
HOLDER_PREFIX = "kept-views-wait-"


@dataclass
class Round:
    holder: str
    pending: set[str]  # clients it waits for
    deadline: float  # time.monotonic()


class Declarations:
    def __init__(self, scheduler: Any, directory: Directory, owners: Owners, took_back_msg: Callable[[], dict]) -> None:
        self.scheduler = scheduler
        self.directory = directory
        self.owners = owners
        self.took_back_msg = took_back_msg
        self.wait = float(dask.config.get(WAIT_KEY, DEFAULT_WAIT))
        self.started = time.monotonic()
        self.rounds: dict[int, Round] = {}
        self.last = 0  # the latest round opened; the took-back event names it
        self._numbers = itertools.count(1)
        self.complete: set[str] = set()  # worker processes' clients: their one declaration covers every block

    def open(self, variables: Iterable[Variable]) -> int:
        """In the take-back's step: the round leases ``variables`` before anything can free
        or move them, and waits for the clients connected now."""
        n = self.last = next(self._numbers)
        holder = f"{HOLDER_PREFIX}{n}"
        for var in variables:
            self.directory.acquire(var, holder)
        pending = {c for c in self.scheduler.client_comms if c not in self.complete}
        self.rounds[n] = Round(holder, pending, time.monotonic() + self.wait)
        if not self._end_if_done(n):
            self.scheduler.loop.add_callback(self._watch, n)
        return n

    def declared(self, holder: str, round: int, first_id: int) -> dict:
        """``holder`` has leased again every view it kept on the blocks of rounds up to
        ``round`` of the YellowPages whose ids start at ``first_id`` (its took-back event's).
        Another's says nothing of this one's rounds: the views it covered were declared to
        an incarnation that is gone, and this one's event is answered on its own."""
        for value, what in ((round, "the round number"), (first_id, "the first id")):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgumentError(f"declared needs {what} the took-back event named, got {value!r}")
        if first_id != self.directory.first_id:
            return {}
        for n in [n for n in self.rounds if n <= round]:
            self._settle(n, holder)
        return {}

    def declared_all(self, holder: str) -> None:
        """A worker process's client declared every view it kept, on blocks back or not."""
        self.complete.add(holder)
        for n in list(self.rounds):
            self._settle(n, holder)

    def joined(self, client: str) -> None:
        """A client connecting while rounds are open may hold views of their blocks."""
        if client not in self.complete:
            for r in self.rounds.values():
                r.pending.add(client)

    def left(self, client: str) -> None:
        self.complete.discard(client)
        for n in list(self.rounds):
            self._settle(n, client)

    def tell(self, client: str) -> None:
        """Not in the first batch of the client's stream: Dask's client would give up
        reconnecting (``yp/client_events.py``); it is told again within ``TELL_AGAIN``."""
        if not stream_started(self.scheduler, client):
            return
        event = (time.time(), self.took_back_msg())
        self.scheduler.report({"op": "event", "topic": EVENT_TOPIC, "event": event}, client=client)

    def _settle(self, n: int, holder: str) -> None:
        self.rounds[n].pending.discard(holder)
        self._end_if_done(n)

    def _end_if_done(self, n: int) -> bool:
        if self.rounds[n].pending or time.monotonic() < self.started + self.wait:
            return False
        self._end(n)
        return True

    async def _watch(self, n: int) -> None:
        while (r := self.rounds.get(n)) is not None:
            await asyncio.sleep(TELL_AGAIN)
            if self.rounds.get(n) is not r or self._end_if_done(n):
                return
            if time.monotonic() >= r.deadline:
                if r.pending:
                    logger.warning(
                        "take-back %d: %d client(s) did not declare their kept views within %.0f s (%s); "
                        "the memory under their views may be reused",
                        n,
                        len(r.pending),
                        self.wait,
                        sorted(r.pending)[:5],
                    )
                self._end(n)
                return
            for client in r.pending:
                self.tell(client)

    def _end(self, n: int) -> None:
        r = self.rounds.pop(n)
        self.owners.free_later(self.directory.drop_holder(r.holder))
        logger.info("take-back %d: the wait for kept views ends", n)
