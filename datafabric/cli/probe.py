"""What answers at an address, found out within the command's timeout before any Dask
client is made.

A Dask ``Client`` pointed at the wrong thing fails badly: at a worker it waits out its
timeout and prints a traceback; at an HTTP server (the dashboard) it waits for ever,
since the server waits for a request that never comes; at any other service it reads
garbage as a frame length and tries to allocate exabytes.  So the commands first listen:
a Dask server speaks first (its handshake), an HTTP server answers a request, and then
a Dask server is asked who it is.  Every step shares one deadline.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import distributed.comm
from distributed.security import Security

from datafabric.cli.app import CliError

_SPEAKS_FIRST = 1.0  # seconds a Dask server gets to send its handshake before we ask
_HTTP_REQUEST = b"HEAD / HTTP/1.0\r\n\r\n"
_DASK_HANDSHAKE = b"pickle-protocol"  # a key of the handshake every Dask comm sends first


def require_scheduler(address: str, timeout: float) -> None:
    """Return if a Dask scheduler answers at ``address`` within ``timeout``; else raise
    one ``CliError`` line naming what answered: a worker, an HTTP server, something that
    is not Dask, or nothing."""
    try:
        asyncio.run(asyncio.wait_for(_require_scheduler(address, time.monotonic() + timeout), timeout))
    except TimeoutError:
        raise CliError(f"cannot reach the scheduler at {address}: nothing answered within {timeout:g} s") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"cannot reach the scheduler at {address}: {exc}") from None


async def _require_scheduler(address: str, deadline: float) -> None:
    scheme, _, _ = address.rpartition("://")
    if scheme in ("", "tcp"):  # tls:// and the others: Dask's own comm below tells
        await _listen_for_dask(address)
    tls = Security().get_connection_args("client")  # Dask's TLS config, as the Client will use it
    comm = await distributed.comm.connect(address, timeout=max(0.1, deadline - time.monotonic()), **tls)
    try:
        await comm.write({"op": "identity", "reply": True})
        identity = await comm.read()
    finally:
        await comm.close()
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind == "Scheduler":
        return
    if kind in ("Worker", "Nanny"):
        hint = f"; its scheduler is {identity['scheduler']}" if identity.get("scheduler") else ""
        raise CliError(f"{address} is a Dask {kind.lower()}, not a scheduler{hint}: pass that with --scheduler")
    raise CliError(f"{address} is a Dask server of type {kind!r}, not a scheduler")


async def _listen_for_dask(address: str) -> None:
    """Connect with plain TCP and see what the other end says, or says to HTTP."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.hostname is None or parts.port is None:
        raise CliError(f"cannot reach the scheduler at {address}: give it as tcp://HOST:PORT")
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    except ConnectionRefusedError:
        raise CliError(f"cannot reach the scheduler at {address}: nothing listens there (connection refused)") from None
    try:
        try:
            data = await asyncio.wait_for(reader.read(4096), _SPEAKS_FIRST)
        except TimeoutError:
            writer.write(_HTTP_REQUEST)  # silent: perhaps a server that waits for a request
            await writer.drain()
            data = await reader.read(4096)
    finally:
        writer.close()
    if _DASK_HANDSHAKE in data:
        return
    if data.startswith(b"HTTP/"):
        raise CliError(
            f"{address} is an HTTP server (a Dask dashboard?), not a Dask scheduler; "
            "the scheduler listens on its own port, 8786 by default"
        )
    said = "closed the connection" if not data else f"sent {data[:16]!r}"
    raise CliError(f"{address} is not a Dask scheduler: something that is not Dask {said}")
