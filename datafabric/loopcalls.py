"""The fabric's calls for a reference being turned back into a view, wherever that runs.

Dask deserialises small messages (task arguments, results, transfers, scattered data)
on its event loop.  A blocking call through the worker's or client's own connections
would wait for that very loop (``sync`` refuses it).  So, on an event loop:

- on the loop of the scheduler that runs this fabric's YellowPages (a ``LocalCluster``'s
  client shares it; the scheduler unpickles task graphs on it), the lease is taken from
  the YellowPages directly, in the same step, with no message;
- on any other loop (a worker's, a remote client's), the call goes over a connection of
  this module's own, served by a private event loop in a thread of its own, and the
  calling loop waits for it.  The caller's lease is still its own (same holder, released
  on its own stream as ``fabric.get``'s are).

Off an event loop (a task, the user's thread) the ordinary context serves.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import threading
from typing import Any

import distributed
from distributed.core import rpc

from datafabric.context import ClientContext, Context, WorkerContext, _connection_lost, current_context
from datafabric.errors import NoFabricError, VariableUnavailableError, WorkerLostError
from datafabric.node import configured_node
from datafabric.protocol import SCHEDULER_PLUGIN, raise_if_refused

CALL_TIMEOUT = 60.0  # seconds a loop waits for a lease (a compaction of the block may hold it)


def context_for(address: str) -> Any:
    """The context through which this thread takes leases of the fabric at ``address``."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return current_context(address)
    yp = _yellowpages_on(running, address)
    if yp is not None:
        return InProcessContext(yp)
    return BlockingContext(_process_context(address))


def _yellowpages_on(loop: asyncio.AbstractEventLoop, address: str) -> Any:
    for scheduler in list(distributed.Scheduler._instances):
        if scheduler.address == address and getattr(scheduler.loop, "asyncio_loop", None) is loop:
            yp = scheduler.plugins.get(SCHEDULER_PLUGIN)
            if yp is not None and yp.running:
                return yp
    return None


def _process_context(address: str) -> Context:
    """This process's worker or client of the scheduler at ``address``, never a new
    client (creating one would block this loop)."""
    for worker in list(distributed.Worker._instances):
        if worker.scheduler.address == address and worker.status.name == "running":
            return WorkerContext(worker)
    try:
        client = distributed.Client.current(allow_global=True)
    except ValueError:
        client = None
    if client is None or client.scheduler is None or client.scheduler.address != address:
        raise NoFabricError(f"this process has no worker or client of the scheduler at {address} to read a view by")
    return ClientContext(client)


class InProcessContext:
    """The scheduler's own loop: the YellowPages is in this process and grants at once."""

    can_fetch = False  # the scheduler only passes references on; it never fetches bytes

    def __init__(self, yp: Any) -> None:
        self.yp = yp
        self.holder = f"scheduler {yp.scheduler.address}"
        self.node = configured_node()

    def call(self, op: str, **kwargs: Any) -> Any:
        if op != "acquire_ref":
            raise NoFabricError(f"the fabric's {op!r} cannot run on the scheduler's event loop")
        grant = self.yp.reads.lease_ref_now(**kwargs)
        if grant is None:
            raise VariableUnavailableError(
                f"variable id {kwargs['var_id']} is being moved by a compaction and no view holds it; try again"
            )
        return grant

    def send(self, msg: dict) -> None:
        """A release, from whichever thread the pin's finalizer runs in."""
        kwargs = {k: v for k, v in msg.items() if k != "op"}
        try:
            self.yp.scheduler.loop.add_callback(functools.partial(self.yp.reads.release, **kwargs))
        except RuntimeError:
            pass  # the scheduler's loop has closed, and the leases with it


class BlockingContext(Context):
    """``base``'s holder, node and one-way stream, with its calls on a private loop."""

    can_fetch = True

    def __init__(self, base: Context) -> None:
        self.base = base
        self.holder = base.holder
        self.node = base.node
        self.scheduler_address = base.scheduler_address
        self.connection_args = (
            base.worker.connection_args if isinstance(base, WorkerContext) else base.client.connection_args
        )

    @property
    def gone(self) -> bool:
        return self.base.gone

    def send(self, msg: dict) -> None:
        self.base.send(msg)

    def _call(self, op: str, **kwargs: Any) -> Any:
        return _private.call(self.scheduler_address, self.connection_args, op, kwargs)

    def call_worker(self, address: str, op: str, **kwargs: Any) -> Any:
        with _connection_lost(op, f"worker {address}"):
            answer = _private.call(address, self.connection_args, op, kwargs)
        return raise_if_refused(answer)


class _PrivateLoop:
    """One event loop in a daemon thread, started on first use, with a kept connection
    per address (closed when the process exits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rpcs: dict[str, Any] = {}

    def call(self, address: str, connection_args: dict, op: str, kwargs: dict) -> Any:
        future = asyncio.run_coroutine_threadsafe(self._call(address, connection_args, op, kwargs), self._started())
        try:
            return future.result(CALL_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise WorkerLostError(
                f"the fabric's {op!r} call to {address} had no answer in {CALL_TIMEOUT:.0f} s"
            ) from None

    async def _call(self, address: str, connection_args: dict, op: str, kwargs: dict) -> Any:
        r = self._rpcs.get(address)
        if r is None:
            r = self._rpcs[address] = rpc(address, connection_args=connection_args)
        return await getattr(r, f"datafabric_{op}")(**kwargs)

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="datafabric-loopcalls", daemon=True).start()
                atexit.register(self._close)
            return self._loop

    def _close(self) -> None:
        async def close_all() -> None:
            for r in self._rpcs.values():
                await r.close_rpc()

        if self._loop is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(2)


_private = _PrivateLoop()
