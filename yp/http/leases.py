"""Leases with a time to live, for readers that are not Dask processes (a C program, a
browser, ``curl``).

Each HTTP lease is a lease of the directory like any other, held by a holder of its own
(``http-lease-<id>``): moves, migrations, evictions and frees treat it as they treat a
view's lease (``yp/reads.py``).  It ends when its reader releases it, when its time to live
passes without a renewal (a second ``POST``), or when the fabric shuts down.  After it
ends, the memory it held may be freed and reused at once: a reader must not touch the
mapping after its lease's ``expires`` (``native/datafabric.h`` says the same to C).

A ``GET data/`` holds a lease of this module's kind for exactly as long as its response
runs (``Leases.hold``), whether it ends by completion, error or a client hanging up.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datafabric.errors import InvalidArgumentError, LeaseNotFoundError
from datafabric.messages import VariableInfo

if TYPE_CHECKING:
    from yp.plugin import YellowPages

DEFAULT_TTL = 60.0
MAX_TTL = 3600.0
HOLDER_PREFIX = "http-lease-"


@dataclass
class Lease:
    lease_id: str
    name: str
    var_id: int
    expires: float | None  # time.time() at which it lapses; None: when it is released
    timer: asyncio.TimerHandle | None


def parse_ttl(text: str | None) -> float:
    if text is None:
        return DEFAULT_TTL
    try:
        ttl = float(text)
    except ValueError:
        ttl = float("nan")
    if not 0 < ttl <= MAX_TTL:
        raise InvalidArgumentError(f"ttl must be a number of seconds in (0, {MAX_TTL:g}], got {text!r}")
    return ttl


class Leases:
    def __init__(self, yp: YellowPages) -> None:
        self.yp = yp
        self.held: dict[str, Lease] = {}

    async def take(self, name: str, ttl: float | None) -> tuple[Lease, VariableInfo]:
        """A new lease on ``name``, granted as a get's is: once no block of it is moving.
        The caller reads the copies' offsets before its next ``await``."""
        lease_id = secrets.token_hex(16)
        info = await self.yp.reads.acquire(name, HOLDER_PREFIX + lease_id)
        lease = Lease(lease_id, name, info["var_id"], None, None)
        self.held[lease_id] = lease
        if ttl is not None:
            self._lapse_in(lease, ttl)
        return lease, info

    def _lapse_in(self, lease: Lease, ttl: float) -> None:
        lease.timer = asyncio.get_running_loop().call_later(ttl, self.release, lease.lease_id)
        lease.expires = time.time() + ttl

    def renew(self, lease_id: str, name: str, ttl: float) -> Lease:
        lease = self.get(lease_id)
        if lease.name != name:
            raise InvalidArgumentError(f"lease {lease_id[:8]}... is on {lease.name!r}, not on {name!r}")
        if lease.timer is None:
            raise InvalidArgumentError(f"lease {lease_id[:8]}... belongs to a response and is not renewed")
        lease.timer.cancel()
        self._lapse_in(lease, ttl)
        return lease

    def get(self, lease_id: str) -> Lease:
        lease = self.held.get(lease_id)
        if lease is None:
            raise LeaseNotFoundError(
                f"no lease {lease_id[:8]}... is held: it was released or it lapsed; take a new one"
            )
        return lease

    def release(self, lease_id: str) -> None:
        lease = self.held.pop(lease_id, None)
        if lease is None:
            raise LeaseNotFoundError(f"no lease {lease_id[:8]}... is held: it was released or it lapsed")
        if lease.timer is not None:
            lease.timer.cancel()
        self.yp.reads.release(lease.var_id, HOLDER_PREFIX + lease_id)

    def release_all(self) -> None:
        for lease_id in list(self.held):
            self.release(lease_id)

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[VariableInfo]:
        """A lease for exactly the length of one response, with no time to live: a slow
        client cannot outlast it and read memory that was freed."""
        lease, info = await self.take(name, None)
        try:
            yield info
        finally:
            with contextlib.suppress(LeaseNotFoundError):
                self.release(lease.lease_id)


def lease_answer(lease: Lease, **extra: Any) -> dict:
    return {"lease": lease.lease_id, "name": lease.name, "expires": lease.expires, **extra}
