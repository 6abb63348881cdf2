"""The ``Fabric`` object: the user's handle on a running fabric (``datafabric.startup``
makes one), and ``Pointer``, the C-style handle of ``get_ptr``."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from typing import Any

import distributed
import numpy as np
from ndtypes import ndt

from datafabric import arguments
from datafabric.accounting import MemoryReport
from datafabric.buffers import Source, prepare
from datafabric.catalog import Catalog
from datafabric.context import Context, current_context
from datafabric.datasets.methods import DatasetMethods
from datafabric.errors import (
    NameExistsError,
    NameNotFoundError,
    NoFabricError,
    NotOnThisNodeError,
    OutOfSpaceError,
    VariableUnavailableError,
)
from datafabric.locality import submit_near
from datafabric.names import validate_name, validate_new_name
from datafabric.protocol import TRANSFER_CHUNK
from datafabric.reads import ManyReads, task_reads
from datafabric.types import from_datashape, parse_type
from datafabric.views import LocalState, _Pin, local_state
from datafabric.web import WebMixin
from datafabric.writer import Creation, PendingWrite, seal_all

Location = tuple[str, str, int]
_READ_TRIES = 3  # a remote read follows a copy that a deallocate migrated this many times


class Fabric(Catalog, MemoryReport, ManyReads, DatasetMethods, WebMixin):
    """Small and picklable: it holds the scheduler's address and the fabric id, and
    finds the calling process's way to the fabric on every call."""

    def __init__(self, address: str, fabric_id: str, *, client: Any = None) -> None:
        self.address = address
        self.fabric_id = fabric_id
        self._client = client
        self._local: LocalState | None = None

    def __reduce__(self) -> tuple:
        return (Fabric, (self.address, self.fabric_id))

    def __repr__(self) -> str:
        return f"<Fabric {self.fabric_id[:8]} on {self.address}>"

    # -- managing memory ---------------------------------------------------------------
    def allocate(self, num_megabytes: float) -> list[tuple[str, str]]:
        """Add blocks holding ``num_megabytes`` in all, spread evenly over the nodes and
        split among each node's workers; returns ``[(node, shm_id), ...]``."""
        mb = arguments.megabytes(num_megabytes, "num_megabytes")
        return [tuple(b) for b in self._ctx().call("allocate", mb=mb)]

    def deallocate(self, node: str, shm_id: str, *, migrate: bool = False) -> None:
        """Unlink a block; refused while it holds live variables, unless ``migrate``,
        which first copies them to other blocks of the same node."""
        node, shm_id = arguments.text(node, "node"), arguments.text(shm_id, "shm_id")
        self._ctx().call("deallocate", node=node, shm_id=shm_id, migrate=arguments.flag(migrate, "migrate"))
        self._state.detach([shm_id])

    def defragment(self, node: str | None = None) -> dict:
        """Compact the blocks (of ``node``), moving only variables no view holds.
        Returns the names moved and, per block, bytes moved and the largest free
        extent before and after."""
        report = self._ctx().call("defragment", node=None if node is None else arguments.text(node, "node"))
        return {"moved": list(report["moved"]), "blocks": [{**b, "moved": list(b["moved"])} for b in report["blocks"]]}

    def shutdown(self) -> None:
        """Unlink every block of the fabric on every node.  A fabric shut down already
        (by this call, by ``datafabric stop``, by closing the cluster) is left as it is:
        ending something that has ended is not an error."""
        try:
            self._ctx().call("shutdown", fabric_id=self.fabric_id)
        except NoFabricError:
            pass

    # -- writing -----------------------------------------------------------------------
    def insert(self, name: str, doc: str, tp: Any, buf: Any) -> list[Location]:
        """Copy ``buf`` once into shared memory as the write-once variable ``name``."""
        validate_new_name(name)
        arguments.doc(doc)
        source = prepare(tp, buf)
        write = PendingWrite(self._ctx(), self._state, self.fabric_id, name, doc, source.type, remote_ok=True)
        try:
            _copy(write, source)
        except BaseException:
            write.abort()
            raise
        return _locations(write.seal())

    def insert_many(self, items: Iterable[tuple[str, str, Any, Any]]) -> list[list[Location]]:
        """``insert`` for many ``(name, doc, tp, buf)`` at once, sealed with one RPC, all
        or none: the fast path for many small variables written from a task.  Every item
        is checked before the first is reserved."""
        prepared = [
            (validate_new_name(n), arguments.doc(d), prepare(tp, buf)) for n, d, tp, buf in arguments.items(items)
        ]
        ctx = self._ctx()
        writes: list[PendingWrite] = []
        try:
            for name, doc, source in prepared:
                write = PendingWrite(ctx, self._state, self.fabric_id, name, doc, source.type, remote_ok=True)
                writes.append(write)
                _copy(write, source)
        except BaseException:
            for write in writes:
                write.abort()
            raise
        return [_locations(info) for info in seal_all(writes)]

    def create(self, name: str, doc: str, tp: Any, fill: Any = 0) -> Creation:
        """Reserve ``name`` and hand out its memory to fill in place (zero-copy
        producers: ``np.add(a, b, out=...)``, ``f.readinto(...)``); see ``Creation``.

        The memory reads as ``fill`` (0 by default, as h5py and zarr give) until written,
        never as a deleted variable's bytes.  ``fill=None`` skips that pass, for
        producers that write every byte anyway; what they leave unwritten is then
        undefined.  A name that exists is refused here, before any filling (and again
        at the seal, where two creators of one name race)."""
        validate_new_name(name)
        arguments.doc(doc)
        ftype = parse_type(tp)  # a bare numpy dtype is refused: create needs the shape too
        value = arguments.fill_value(fill, ftype.dtype)
        ctx = self._ctx()
        try:
            ctx.call("info", name=name)
        except NameNotFoundError:
            pass
        else:
            raise NameExistsError(f"a variable named {name!r} exists; variables are write-once, delete it first")
        return Creation(PendingWrite(ctx, self._state, self.fabric_id, name, doc, ftype), value)

    # -- reading -----------------------------------------------------------------------
    def get(self, name: str, *, cache: bool = True) -> np.ndarray:
        """A read-only numpy view of the variable's shared memory, no copy; the view (and
        every slice) holds the memory.  In a task on a node holding it, the lease is
        taken in process; elsewhere the first get asks the YellowPages once.  When no copy is on this process's node, the bytes come over the network from a
        worker that has one and, with ``cache`` (the default), land in a block of this
        node as a replica, so the next get here is local.  Without ``cache``, or where
        this node has no blocks, the array is a private read-only copy."""
        if cache is not True and cache is not False:  # identity first: the warm path costs ~1 µs
            cache = arguments.flag(cache, "cache")
        if type(name) is str:  # cached and published names are valid ones: no validation
            view = self._state.cached_view(name) if cache else None
            if view is not None:
                return view
            reads = task_reads(self.fabric_id, self.address)
            if reads is not None and (view := reads.view(name)) is not None:  # a task on a node holding it: no RPC
                return view
        validate_name(name)
        ctx = self._ctx()
        since = self._state.epoch  # before the lease: see ``LocalState.pin``
        info = ctx.call("acquire", name=name, holder=ctx.holder)
        pin = self._local_pin(ctx, info, name, since)
        if pin is None and cache and ctx.node is not None:
            try:
                info = ctx.call("replicate_to", name=name, node=ctx.node)
            except (NotOnThisNodeError, OutOfSpaceError):
                pass  # no room or no blocks here: read a private copy instead
            else:
                pin = self._local_pin(ctx, info, name, since)
        if pin is not None:
            return pin.view()
        lease = _release_msg(ctx, info)
        try:
            for attempt in range(_READ_TRIES):
                if not any(info["workers"]):
                    raise VariableUnavailableError.on_nodes(name, [loc[0] for loc in info["locations"]])
                try:
                    return self._fetch(ctx, info)
                except VariableUnavailableError:  # its copy moved to another block while it was read
                    if attempt + 1 == _READ_TRIES:
                        raise
                    info = ctx.call("info", name=name)
                    if info["var_id"] != lease["var_id"]:
                        raise NameNotFoundError(f"{name!r} was deleted while it was being read") from None
        finally:
            ctx.send(lease)

    def _fetch(self, ctx: Context, info: dict) -> np.ndarray:
        """The variable's bytes over Dask's comms into private memory, in chunks."""
        ftype = from_datashape(info["type"])
        pairs = zip(info["locations"], info["workers"], strict=True)
        (_, shm_id, offset), worker = next((loc, w) for loc, w in pairs if w)
        out = np.empty(ftype.nbytes, np.uint8)
        for start in range(0, ftype.nbytes, TRANSFER_CHUNK):
            n = min(TRANSFER_CHUNK, ftype.nbytes - start)
            answer = ctx.call_worker(worker, "read", shm_id=shm_id, data_offset=offset + start, nbytes=n)
            out[start : start + n] = np.frombuffer(answer["data"], np.uint8)
        view = out.view(ftype.dtype).reshape(ftype.shape)
        view.flags.writeable = False
        return view

    def get_ptr(self, node: str, shm_id: str, offset: int) -> Pointer:
        """The type and address of the variable stored at a location of this node; the
        memory stays valid until the returned object is closed."""
        node, shm_id = arguments.text(node, "node"), arguments.text(shm_id, "shm_id")
        offset = arguments.whole(offset, "offset")
        ctx = self._ctx()
        if ctx.node is not None and node != ctx.node:
            raise NotOnThisNodeError(f"location is on node {node!r}, this process is on node {ctx.node!r}")
        since = self._state.epoch
        info = ctx.call("acquire_at", node=node, shm_id=shm_id, offset=offset, holder=ctx.holder)
        [extent_id] = [
            e for (_, s, o), e in zip(info["locations"], info["extent_ids"], strict=True) if (s, o) == (shm_id, offset)
        ]
        info["locations"], info["extent_ids"] = [[node, shm_id, offset]], [extent_id]
        pin = self._local_pin(ctx, info, info["name"], since)
        if pin is None:
            ctx.send(_release_msg(ctx, info))
            raise NotOnThisNodeError(f"block {shm_id} of node {node!r} cannot be mapped by this process")
        return Pointer(ndt(info["type"]), pin)

    def _local_pin(self, ctx: Context, info: dict, name: str, since: int) -> _Pin | None:
        """A pin of the copy on this process's node, cached under ``name`` if no
        invalidation came since the state's ``epoch`` was ``since`` (read before the lease).
        The pin holds the lease of ``info``; None (no copy here): the caller still does.
        If this fails, the lease is ended here: a pin that failed to be made or cached
        ends none (``LocalState.pin``), and the caller holds it no more."""
        try:
            ftype = from_datashape(info["type"])
            for (node, shm_id, offset), extent_id in zip(info["locations"], info["extent_ids"], strict=True):
                if ctx.node is not None and node != ctx.node:
                    continue
                segment = self._state.segment(node, shm_id)
                if segment is not None:
                    lease = _release_msg(ctx, info)
                    return self._state.pin(name, node, segment, offset, extent_id, ftype, lease, ctx.send, since=since)
        except BaseException:
            ctx.send(_release_msg(ctx, info))
            raise
        return None

    def replicate(self, name: str, nodes: list[str] | int | None = None) -> list[Location]:
        """Copy ``name`` ahead of time to the given nodes, to ``nodes`` (an int) more
        nodes, or to every node; returns all its locations."""
        validate_name(name)
        return _locations(self._ctx().call("replicate", name=name, **arguments.replica_targets(nodes)))

    def where(self, *names: str) -> list[str]:
        """Addresses of the workers on the nodes that hold ``names``: pass them as
        ``client.submit(f, ..., workers=fabric.where(name))`` to run next to the data."""
        return list(self._ctx().call("where", names=[validate_name(n) for n in names]))

    def submit(self, func: Any, *names: str, **kwargs: Any) -> Any:
        """``client.submit(func, *views)`` on a worker of the node holding the named variables
        (any of its workers alive then: ``datafabric.locality``), each its zero-copy view."""
        if not callable(func):
            raise arguments.refuse("func", func, "a callable")
        for name in names:
            validate_name(name)
        client = self._client or distributed.get_client(self.address)
        return submit_near(self, client, _call_on_views, func, names, kwargs)

    def get_locations(self, name: str) -> list[Location]:
        return _locations(self._ctx().call("info", name=validate_name(name)))

    def info(self, name: str) -> dict:
        info = self._ctx().call("info", name=validate_name(name))
        keys = ("name", "doc", "type", "nbytes", "dataset")  # a dataset's has "dataset": shape, chunks, written
        return {k: info[k] for k in keys if k in info} | {"locations": _locations(info)}

    def status(self) -> list[dict]:
        """Per block: node, worker, size, used, free, largest free extent, variables."""
        return list(self._ctx().call("status"))

    # -- deleting ----------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """The name disappears at once; its memory is freed when the last view of it, in
        every process, is gone."""
        self._ctx().call("delete", name=validate_name(name))
        self._state.forget(name)

    # -- plumbing ----------------------------------------------------------------------
    @property
    def _state(self) -> LocalState:
        if self._local is None:
            self._local = local_state(self.fabric_id, self.address)
        return self._local

    def _ctx(self) -> Context:
        return current_context(self.address, self._client)


class Pointer:
    """``(ndt type, ctypes.c_void_p)`` that unpacks as a pair and holds the memory (and
    its lease) until ``close()`` or the end of its ``with`` block."""

    def __init__(self, type_: ndt, pin: _Pin) -> None:
        self.type = type_
        self.address = ctypes.c_void_p(pin.__array_interface__["data"][0])
        self._pin: _Pin | None = pin

    def __iter__(self) -> Iterator[Any]:
        if self._pin is None:
            raise ValueError("pointer is closed")
        return iter((self.type, self.address))

    def close(self) -> None:
        self._pin = None

    @property
    def closed(self) -> bool:
        return self._pin is None

    def __enter__(self) -> Pointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy(write: PendingWrite, source: Source) -> None:
    """The one copy of an insert: into the mapping, or streamed to a node off this one."""
    if write.segment is None:
        write.stream(source)
        return
    dest = write.memory()
    try:
        source.copy_into(dest)
    finally:
        dest.release()


def _call_on_views(fabric: Fabric, func: Any, names: tuple[str, ...]) -> Any:
    return func(*fabric.get_many(names))


def _release_msg(ctx: Context, info: dict) -> dict:
    return {"op": "datafabric_release", "var_id": info["var_id"], "holder": ctx.holder}


def _locations(info: dict) -> list[Location]:
    return [(node, shm_id, int(offset)) for node, shm_id, offset in info["locations"]]
