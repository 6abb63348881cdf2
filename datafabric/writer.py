"""One write into the fabric, from reservation to seal: shared by ``insert`` (copy a
buffer in) and ``create`` (let the producer fill the memory in place).

A reservation is invisible until sealed.  Whatever goes wrong before the seal (an
exception, a refused name, the object being dropped unsealed) gives the extent back, so
a failed write leaves nothing visible and nothing allocated.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from typing import Any

import numpy as np
from distributed.protocol import to_serialize

from datafabric.context import Context
from datafabric.errors import HolderAwayError, NotOnThisNodeError
from datafabric.layout import ExtentState
from datafabric.messages import Placement, Reservation, SealItem, VariableInfo
from datafabric.processes import this_process
from datafabric.protocol import TRANSFER_CHUNK
from datafabric.shm import Segment
from datafabric.types import FabricType
from datafabric.views import LocalState

AWAY_POLL = 0.1  # seconds between seals tried while the client's stream reconnects


class PendingWrite:
    def __init__(
        self,
        ctx: Context,
        state: LocalState,
        fabric_id: str,
        name: str,
        doc: str,
        ftype: FabricType,
        *,
        remote_ok: bool = False,
    ) -> None:
        self.ctx, self.name, self.doc, self.type = ctx, name, doc, ftype
        plugin = ctx.plugin if ctx.plugin is not None and ctx.plugin.fabric_id == fabric_id else None
        res = plugin.reserve_local(name, ftype.datashape, doc, ftype.nbytes) if plugin else None
        self.local = res is not None  # in this worker's own block: no YellowPages bookkeeping
        if self.local:
            res["node"] = plugin.node
        else:
            res = ctx.call(
                "reserve",
                name=name,
                type=ftype.datashape,
                doc=doc,
                nbytes=ftype.nbytes,
                node=ctx.node,
                holder=ctx.holder,
                process=this_process(),  # it may map the block: kept while it lives, if it leaves
            )
        self.res: Reservation | Placement = res
        self._lock = threading.Lock()
        self._open = True
        mappable = ctx.node is None or ctx.node == res["node"]
        self.segment: Segment | None = state.segment(res["node"], res["shm_id"]) if mappable else None
        if self.segment is None and not remote_ok:
            self.abort()
            raise NotOnThisNodeError(
                f"the fabric placed {name!r} on node {res['node']}, which this process cannot map; "
                "create it in a task on a worker of that node, or use insert"
            )

    def memory(self) -> memoryview:
        start = self.res["data_offset"]
        return self.segment.buf[start : start + self.type.nbytes]

    def stream(self, source: Any) -> None:
        """For a writer off the node: the bytes go to the block's owner over Dask's comms,
        in chunks, after one copy into private memory."""
        staging = np.empty(self.type.nbytes, np.uint8)
        source.copy_into(memoryview(staging))
        for start in range(0, self.type.nbytes, TRANSFER_CHUNK):
            chunk = staging[start : start + TRANSFER_CHUNK]
            self.ctx.call_worker(
                self.res["worker"],
                "write",
                shm_id=self.res["shm_id"],
                extent_offset=self.res["extent_offset"],
                extent_id=self.res["extent_id"],
                data_offset=self.res["data_offset"] + start,
                data=to_serialize(chunk.data),
            )

    def seal(self) -> VariableInfo:
        """Make the variable visible; if the YellowPages refuses, give the space back."""
        return seal_all([self])[0]

    def _finish(self) -> None:
        with self._lock:
            if not self._open:
                raise ValueError(f"the write of {self.name!r} is finished already")
            self._open = False

    def _seal_request(self) -> SealItem:
        keys = ("shm_id", "extent_offset", "extent_size", "data_offset", "extent_id")
        return {"name": self.name, "doc": self.doc, "type": self.type.datashape, "nbytes": self.type.nbytes} | {
            k: self.res[k] for k in keys
        }

    def _sealed(self) -> None:
        """A writer that owns the block marks its header itself (the YellowPages marks
        every other writer's before it answers), however the extent was placed."""
        plugin = self.ctx.plugin
        if plugin is not None and plugin.owns(self.res["shm_id"]):
            r = self.res
            plugin.mark(ExtentState.SEALED, [(r["shm_id"], r["extent_offset"], r["extent_id"], self.name)])

    def abort(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
        self._give_back()

    def _give_back(self) -> None:
        if self.local:
            self.ctx.plugin.free_local(self.res["shm_id"], self.res["extent_offset"], self.res["extent_id"])
        elif not self.ctx.gone:  # else the scheduler gives a departed holder's reservations back itself
            r = self.res
            self.ctx.call("abort", shm_id=r["shm_id"], extent_offset=r["extent_offset"], extent_id=r["extent_id"])


def seal_all(writes: list[PendingWrite]) -> list[VariableInfo]:
    """Seal several writes of one process with one RPC, all or none: if any name is
    refused, every write gives its space back."""
    if not writes:
        return []
    for write in writes:
        write._finish()
    ctx = writes[0].ctx
    try:
        infos = _seal(ctx, [w._seal_request() for w in writes])
    except BaseException:
        for write in writes:
            write._give_back()
        raise
    for write in writes:
        write._sealed()
    return infos


def _seal(ctx: Context, items: list) -> list[VariableInfo]:
    """The seal, tried again while the YellowPages counts this client gone because its
    stream broke (``HolderAwayError``), until it reconnects under its id, for as long as
    Dask's client tries to (``distributed.comm.timeouts.connect``).  Sound: that refusal
    comes before the seal changes anything, and the YellowPages keeps a departed live
    writer's reservations for its seal (``yp/departed.py``); a reservation ended meanwhile
    is refused as such, and given back.  Bounded twice over: by the client, which closes
    once its reconnection times out, and by twice that timeout (its stream's break may be
    noticed late), then refused."""
    deadline = time.monotonic() + 2 * ctx.reconnect_timeout
    while True:
        try:
            return ctx.call("seal", items=items, holder=ctx.holder)
        except HolderAwayError:
            if not ctx.reconnects or time.monotonic() >= deadline:
                raise
            time.sleep(AWAY_POLL)
            if not ctx.reconnects:  # gave up meanwhile (a closed client has no scheduler to call)
                raise


class Creation:
    """A variable being produced in place.  ``array`` is a writable view of its shared
    memory; ``seal()`` (or leaving the ``with`` block normally) makes it visible and
    read-only, an exception in the block (or dropping the object unsealed) discards it.

    >>> with fabric.create("sum", "a + b", "1000 * float64") as out:
    ...     np.add(a, b, out=out)
    """

    def __init__(self, write: PendingWrite, fill: np.ndarray | None = None) -> None:
        self._write = write
        self._finalizer = weakref.finalize(self, write.abort)
        raw = (
            np.frombuffer(write.memory(), dtype=write.type.dtype)
            if write.type.nbytes
            else np.empty(0, write.type.dtype)
        )
        self.array: np.ndarray = raw.reshape(write.type.shape)
        if fill is not None and self.array.nbytes:
            _fill(self.array, fill)
        self.locations: list[tuple[str, str, int]] | None = None

    @property
    def name(self) -> str:
        return self._write.name

    def seal(self) -> list[tuple[str, str, int]]:
        self.array.flags.writeable = False  # the producer's own handle; write-once from here
        info = self._write.seal()
        self._finalizer.detach()
        self.locations = [(n, s, int(o)) for n, s, o in info["locations"]]
        return self.locations

    def abort(self) -> None:
        self._finalizer()

    def __enter__(self) -> np.ndarray:
        return self.array

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.seal()
        else:
            self.abort()


def _fill(array: np.ndarray, value: np.ndarray) -> None:
    """One pass over the reserved memory, so it never shows a deleted variable's bytes:
    a memset for all-zero bytes (the default), numpy's own fill loop otherwise."""
    if not value.tobytes().strip(b"\0"):
        ctypes.memset(array.ctypes.data, 0, array.nbytes)
    else:
        array[...] = value
