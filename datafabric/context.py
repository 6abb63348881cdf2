"""How the calling process talks to the fabric: from inside a task, or from a client.

A ``Fabric`` pickles to an address and a fabric id; each call looks up its context
afresh, so the same object works in the client, inside tasks, and in other processes.
Inside a task the context is the worker itself: it reaches the scheduler over the
worker's own connections and reserves memory in the worker's own blocks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import distributed
from distributed.utils import sync

from datafabric.errors import FabricError, KeptViewLostError, NoFabricError, WorkerLostError
from datafabric.node import configured_node
from datafabric.protocol import EVENT_TOPIC, WORKER_PLUGIN, raise_if_refused
from datafabric.views import all_states

logger = logging.getLogger("datafabric")


class Context:
    holder: str  # whose leases and reservations these are, as the scheduler names it
    node: str | None  # None: a client with no configured node; it maps whatever it can
    plugin: Any = None  # the FabricWorkerPlugin of the worker running the task
    gone: bool  # its connection to the scheduler is closing or closed
    reconnects: bool = False  # counted gone while its stream is broken, it may come back under its id
    reconnect_timeout: float = 0.0  # seconds its reconnection may take at most

    def call(self, op: str, **kwargs: Any) -> Any:
        with _connection_lost(op, f"the scheduler at {self.scheduler_address}"):
            answer = self._call(op, **kwargs)
        result = raise_if_refused(answer)
        if result is None:
            raise NoFabricError(
                f"no datafabric on the scheduler at {self.scheduler_address}; "
                "start one with datafabric.start(client, mb=...) or `datafabric start`"
            )
        return result


class WorkerContext(Context):
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.holder = worker.address
        self.scheduler_address = worker.scheduler.address
        self.plugin = worker.plugins.get(WORKER_PLUGIN)
        self.node = self.plugin.node if self.plugin is not None else configured_node()

    @property
    def gone(self) -> bool:
        return self.worker.status.name in ("closing", "closed", "failed")

    def _call(self, op: str, **kwargs: Any) -> Any:
        return sync(self.worker.loop, getattr(self.worker.scheduler, f"datafabric_{op}"), **kwargs)

    def call_worker(self, address: str, op: str, **kwargs: Any) -> Any:
        with _connection_lost(op, f"worker {address}"):
            answer = sync(self.worker.loop, getattr(self.worker.rpc(address), f"datafabric_{op}"), **kwargs)
        return raise_if_refused(answer)

    def send(self, msg: dict) -> None:
        """One-way, from any thread (finalizers run wherever the GC runs)."""
        try:
            self.worker.loop.add_callback(self.worker.batched_stream.send, msg)
        except (RuntimeError, AttributeError):
            pass  # worker closing: the scheduler drops its leases when it leaves


class ClientContext(Context):
    def __init__(self, client: Any) -> None:
        self.client = client
        self.holder = client.id
        self.scheduler_address = client.scheduler.address
        self.node = configured_node()
        _subscribe(client)

    @property
    def gone(self) -> bool:
        return self.client.status in ("closing", "closed")

    @property
    def reconnects(self) -> bool:
        """Dask's client reconnects under its id while it runs (or is connecting)."""
        return self.client.status in ("running", "connecting")

    @property
    def reconnect_timeout(self) -> float:
        return float(self.client._timeout)  # Dask's own bound on its reconnection (private)

    def _call(self, op: str, **kwargs: Any) -> Any:
        return self.client.sync(getattr(self.client.scheduler, f"datafabric_{op}"), **kwargs)

    def call_worker(self, address: str, op: str, **kwargs: Any) -> Any:
        with _connection_lost(op, f"worker {address}"):
            answer = self.client.sync(getattr(self.client.rpc(address), f"datafabric_{op}"), **kwargs)
        return raise_if_refused(answer)

    def send(self, msg: dict) -> None:
        try:
            self.client.loop.add_callback(self.client._send_to_scheduler, msg)
        except (RuntimeError, AttributeError):
            pass  # client closed: the scheduler drops its leases with it


@contextlib.contextmanager
def _connection_lost(op: str, peer: str) -> Iterator[None]:
    """A comm that closes under a call (``CommClosedError``, or any ``OSError`` of
    Dask's comms, raised here or re-raised from the scheduler, which lost a worker
    it was asking) means a process serving it died or left: say which call."""
    try:
        yield
    except FabricError:
        raise
    except OSError as exc:
        raise WorkerLostError(
            f"the fabric's {op!r} call to {peer} failed: a process serving it died or left "
            f"({type(exc).__name__}: {exc}); a peer of its node adopts what it owned, so retry once it has"
        ) from exc


def current_context(address: str, client: Any = None) -> Context:
    try:
        worker = distributed.get_worker()
    except ValueError:
        worker = None
    if worker is not None and worker.scheduler.address == address:
        return WorkerContext(worker)
    if client is None or client.status in ("closing", "closed"):
        client = distributed.get_client(address)
    return ClientContext(client)


_subscribed: weakref.WeakSet = weakref.WeakSet()
_subscribe_lock = threading.Lock()


def _subscribe(client: Any) -> None:
    """Clients hear of deleted names and unlinked blocks through a Dask event topic."""
    with _subscribe_lock:
        if client in _subscribed:
            return
        _subscribed.add(client)
    client.loop.add_callback(client.subscribe_topic, EVENT_TOPIC, functools.partial(_on_event, client))


def _on_event(client: Any, event: tuple) -> Any:
    _, msg = event
    if msg.get("op") == "datafabric_took_back":
        return _declare_kept_views(client, uuid.UUID(msg["fabric_id"]), msg["first_id"], msg["round"])
    for state in all_states():
        if msg.get("op") == "datafabric_resync" and state.fabric_id == uuid.UUID(msg["fabric_id"]):
            state.forget_prefix("")  # back on the topic after a reconnection: what was missed is unknown
        elif msg.get("op") == "datafabric_invalidate":
            state.invalidate(msg["var_ids"])
        elif msg.get("op") == "datafabric_detach":
            state.detach(msg["shm_ids"])
    return None


async def _declare_kept_views(client: Any, fabric_id: uuid.UUID, first_id: int, round: int) -> None:
    """The scheduler restarted and its YellowPages took blocks back, knowing no lease:
    every view this process kept gets its lease again, by location and extent id, so
    nothing moves or frees the memory under it; then the YellowPages is told, and stops
    holding that memory for this process (``yp/declarations.py``).  Views on blocks not
    back yet are declared at the next such event; a view that died meanwhile releases the
    new lease through its pin.  A view whose extent is gone (declared too late) is left
    unleased, and said so."""
    for state in all_states():
        if state.fabric_id != fabric_id:
            continue
        for pin in state.pins_leased_before(first_id):
            where = {"node": pin.node, "shm_id": pin.segment.name.lstrip("/"), "offset": pin.data_offset}
            try:
                info = raise_if_refused(
                    await client.scheduler.datafabric_acquire_at(**where, extent_id=pin.extent_id, holder=client.id)
                )
            except KeptViewLostError as exc:
                logger.warning("a view kept through the scheduler's restart is not leased again: %s", exc)
                continue
            except (FabricError, OSError):
                continue  # its block is not back yet, or the scheduler is gone again
            pin.lease["var_id"] = info["var_id"]
    with contextlib.suppress(FabricError, OSError):
        answer = await client.scheduler.datafabric_declared(holder=client.id, round=round, first_id=first_id)
        raise_if_refused(answer)
