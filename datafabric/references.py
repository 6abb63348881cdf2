"""Views that travel as references: what Dask and pickle carry instead of the bytes.

``fabric.get`` returns a ``FabricView``, an ``np.ndarray`` subclass that only marks the
array as the fabric's.  When one is pickled, serialised by Dask (task arguments and
results, ``scatter``, transfers between workers, spilling) or sized by ``dask.sizeof``,
what counts is whether its memory is a fabric block's: the chain of ``.base`` ends at a
``_Pin``.  If so it becomes a ``ViewReference`` (the fabric, the variable's id, the copy it
was read from, the byte offset, shape, strides and dtype of the slice: about 400 bytes),
and is sized as that; otherwise (a copy, ``view + 1``) it is an ordinary array.

A reference holds no lease.  Turning it back into a view takes a lease by variable id
(``acquire_ref``), which the YellowPages grants for a visible variable and for a deleted
one that some process still holds: a view kept anywhere keeps its references valid.  A
reference whose variable was deleted and let go by every process raises
``ReferenceGoneError`` (where Dask reads a message, an ``UnreadableReference`` that
raises it when used).  Offsets are not trusted from the reference: the lease's answer
says where the copies are now (a variable no lease held may have been compacted).

Dask deserialises small messages on its event loop, where no blocking call of the
worker's or client's own may run; ``datafabric.loopcalls`` serves those.  On the
scheduler's loop, the YellowPages of this process grants the lease directly; a
scheduler that cannot map the block keeps the reference as it is, and it pickles again
as itself.

**A scheduler carries the views in task arguments as references** (``carrying``): it
only passes them on to workers, and Dask keeps the messages that held them (the last
thousand to each worker, ``BatchedSend.recent_message_log``) long after their tasks are
forgotten, so a view made there would hold its lease, and a deleted variable's memory,
as long.  So while the scheduler unpickles a graph, in whatever process it runs (a
LocalCluster's shares the client's, and could map the blocks), a reference stays one,
holding no lease: a task argument holds its memory no more than the client's view it
came from does, wherever the scheduler is.  But for a scheduler on ``inproc://`` (a
cluster of threads): its comms hand a worker the scheduler's objects themselves,
unpickled, so what the scheduler keeps is what the task gets, and it must be the view.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.sizeof import sizeof
from distributed.protocol import dask_deserialize, dask_serialize
from distributed.protocol.numpy import deserialize_numpy_ndarray, serialize_numpy_ndarray

REFERENCE_SIZE = 512  # what dask.sizeof reports for a view of the fabric: its reference, not the bytes
# The update-graph handler's own task, in its context (see ``carrying``)
_carried: ContextVar[asyncio.Task | None] = ContextVar("datafabric_carried", default=None)


class FabricView(np.ndarray):
    """A numpy array; the arrays ``fabric.get`` returns, and their slices, are of this
    class so that pickle, Dask's serialisation and ``dask.sizeof`` can recognise them.
    Results of arithmetic on them (``view + 1``, ``view.sum()``) are plain arrays."""

    def __array_wrap__(self, array: np.ndarray, context: Any = None, return_scalar: bool = False) -> Any:
        plain = array.view(np.ndarray) if isinstance(array, FabricView) else array
        return plain[()] if return_scalar else plain

    def __reduce_ex__(self, protocol: int) -> Any:
        ref = reference_of(self)
        if ref is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        return ref.__reduce__()

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)


@dataclass(frozen=True)
class ViewReference:
    """Names a slice of a variable's memory: ``offset`` bytes from the start of the
    variable's data, with numpy's ``shape``, ``strides`` and ``dtype``.  ``location``
    (node, shm_id, data offset) is the copy it was read from, for messages; ``var_id``
    is what identifies the variable, visible or deleted."""

    address: str
    fabric_id: str
    var_id: int
    location: tuple[str, str, int]
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype

    def __reduce__(self) -> tuple:
        """Unpickled, a reference becomes a view again (where it can be mapped)."""
        fields = (self.address, self.fabric_id, self.var_id, self.location, self.offset, self.shape, self.strides)
        return (_materialise_fields, (*fields, self.dtype))

    def __repr__(self) -> str:
        node, shm_id, data_offset = self.location
        return (
            f"<ViewReference var {self.var_id} at {node}:{shm_id}+{data_offset}, "
            f"offset {self.offset}, shape {self.shape}, {self.dtype}>"
        )


def pin_of(array: np.ndarray) -> Any:
    """The ``_Pin`` at the end of ``array``'s chain of bases, or None."""
    from datafabric.views import _Pin

    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, _Pin) else None


def reference_of(array: np.ndarray) -> ViewReference | None:
    """The reference ``array`` travels as, or None if it is not (wholly) fabric memory."""
    from datafabric.views import state_of

    pin = pin_of(array)
    if pin is None or array.size == 0:
        return None
    state = state_of(pin)
    if state is None or state.address is None:
        return None
    start = pin.__array_interface__["data"][0]
    offset = array.__array_interface__["data"][0] - start
    low = offset + sum((n - 1) * s for n, s in zip(array.shape, array.strides, strict=True) if s < 0)
    high = offset + sum((n - 1) * s for n, s in zip(array.shape, array.strides, strict=True) if s > 0)
    if low < 0 or high + array.itemsize > pin.ftype.nbytes:
        return None  # as_strided and the like can reach outside the variable: send the bytes
    return ViewReference(
        address=state.address,
        fabric_id=str(state.fabric_id.hex),
        var_id=pin.var_id,
        location=(pin.node, pin.segment.name.lstrip("/"), pin.data_offset),
        offset=offset,
        shape=tuple(array.shape),
        strides=tuple(array.strides),
        dtype=array.dtype,
    )


def materialise(ref: ViewReference) -> Any:
    """The view ``ref`` names, zero-copy on a process of a node holding a copy; off the
    node a private read-only copy (as ``fabric.get(name, cache=False)``).  On a scheduler
    that cannot map the block, ``ref`` itself.  Where Dask reads a message (on an event
    loop) and the view cannot be made, an ``UnreadableReference`` saying why."""
    if _carrying_here() and not ref.address.startswith("inproc://"):
        return ref  # an inproc worker is handed the scheduler's own objects: it needs the view
    try:
        return _view_of(ref)
    except Exception as error:
        if on_event_loop():
            return UnreadableReference(ref, error)
        raise


def _view_of(ref: ViewReference) -> Any:
    from datafabric import loopcalls
    from datafabric.views import local_state

    state = local_state(ref.fabric_id, ref.address)
    ctx = loopcalls.context_for(ref.address)
    since = state.epoch  # before the lease: see ``LocalState.pin``
    grant = ctx.call("acquire_ref", var_id=ref.var_id, holder=ctx.holder)
    info = grant["info"]
    lease = {"op": "datafabric_release", "var_id": info["var_id"], "holder": ctx.holder}
    pin = _local_pin(ctx, state, info, lease, cache=not grant["deleted"], since=since)
    if pin is not None:
        return _slice(pin.view(), ref).view(FabricView)
    try:
        if not ctx.can_fetch:
            return ref
        return _slice(_fetch(ctx, info), ref)
    finally:
        ctx.send(lease)


class UnreadableReference:
    """What a reference unpickles as where Dask reads a message, on an event loop, when
    its view cannot be made: its variable is gone (``ReferenceGoneError``), its fabric
    shut down (``NoFabricError``), no copy is reachable.  Raised there, the error would
    end the stream the message came on: a worker's from the scheduler, with a
    compute-task in it, and the scheduler would send the task to the next worker, ending
    its stream too.  So the task (or whoever gets it) fails with that error at its first
    use of the argument (an attribute, an item, ``np.asarray``); pickled again it is its
    reference."""

    __slots__ = ("reference", "error")

    def __init__(self, reference: ViewReference, error: Exception) -> None:
        self.reference, self.error = reference, error

    def _raise(self) -> Any:
        raise self.error.with_traceback(None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocols probed by Dask, pickle, numpy: not there
            raise AttributeError(name)
        return self._raise()

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return self._raise()

    def __getitem__(self, index: Any) -> Any:
        return self._raise()

    def __len__(self) -> int:
        return self._raise()

    def __iter__(self) -> Any:
        return self._raise()

    def __reduce__(self) -> tuple:
        return self.reference.__reduce__()

    def __repr__(self) -> str:
        return f"<UnreadableReference {self.reference!r}: {type(self.error).__name__}: {self.error}>"


def carrying(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """The scheduler's ``update-graph`` handler, under which the references in the graph
    it unpickles stay references (the module's docstring says why)."""
    if getattr(handler, "carries_references", False):
        return handler

    @functools.wraps(handler)
    async def carry(*args: Any, **kwargs: Any) -> Any:
        token = _carried.set(asyncio.current_task())
        try:
            return await handler(*args, **kwargs)
        finally:
            _carried.reset(token)

    carry.carries_references = True  # type: ignore[attr-defined]
    return carry


def _carrying_here() -> bool:
    """Whether a reference unpickled now is the update-graph handler's to carry: in the
    handler's own task, or off any event loop in a thread that runs with its context
    (Dask's ``offload``, which materialises and orders the graph).  A task created inside
    the handler (by Dask, by a plugin's hook) copies the handler's context, and so the
    variable, but it is another task and outlives the handler: what it unpickles are
    views, as anywhere else."""
    handler = _carried.get()
    if handler is None:
        return False
    try:
        return asyncio.current_task() is handler
    except RuntimeError:  # no event loop in this thread: an offload of the handler's
        return True


def _materialise_fields(*fields: Any) -> Any:
    return materialise(ViewReference(*fields))


def _local_pin(ctx: Any, state: Any, info: dict, lease: dict, *, cache: bool, since: int) -> Any:
    """A pin holding ``lease``, or None (no copy here: the caller still holds it); if this
    fails, ``lease`` is ended here (a pin that failed to be made or cached ends none)."""
    from datafabric.types import from_datashape

    try:
        ftype = from_datashape(info["type"])
        for (node, shm_id, offset), extent_id in zip(info["locations"], info["extent_ids"], strict=True):
            if ctx.node is not None and node != ctx.node:
                continue
            segment = state.segment(node, shm_id)
            if segment is not None:
                return state.pin(
                    info["name"], node, segment, offset, extent_id, ftype, lease, ctx.send, cache=cache, since=since
                )
    except BaseException:
        ctx.send(lease)
        raise
    return None


def _fetch(ctx: Any, info: dict) -> np.ndarray:
    from datafabric.errors import VariableUnavailableError
    from datafabric.fabric import Fabric

    if not any(info["workers"]):
        raise VariableUnavailableError.on_nodes(info["name"], [loc[0] for loc in info["locations"]])
    return Fabric._fetch(None, ctx, info)  # it uses nothing of the Fabric: the copy comes through ctx


def _slice(whole: np.ndarray, ref: ViewReference) -> np.ndarray:
    flat = whole.reshape(-1).view(np.uint8)
    return np.ndarray(ref.shape, ref.dtype, buffer=flat, offset=ref.offset, strides=ref.strides)


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -- Dask ------------------------------------------------------------------------------
@dask_serialize.register(FabricView)
def _serialize(array: FabricView) -> tuple[dict, list]:
    ref = reference_of(array)
    if ref is None:
        return serialize_numpy_ndarray(array.view(np.ndarray))
    from distributed.protocol.pickle import dumps

    return {"datafabric-reference": True}, [dumps(ref)]


@dask_deserialize.register(FabricView)
def _deserialize(header: dict, frames: list) -> Any:
    if not header.get("datafabric-reference"):
        return deserialize_numpy_ndarray(header, frames)
    from distributed.protocol.pickle import loads

    return loads(frames[0])  # a reference unpickles as its view


@dask_serialize.register(ViewReference)
def _serialize_reference(ref: ViewReference) -> tuple[dict, list]:
    from distributed.protocol.pickle import dumps

    return {}, [dumps(ref)]


@dask_deserialize.register(ViewReference)
def _deserialize_reference(header: dict, frames: list) -> Any:
    from distributed.protocol.pickle import loads

    return loads(frames[0])


@sizeof.register(FabricView)
def _sizeof(array: FabricView) -> int:
    return REFERENCE_SIZE if pin_of(array) is not None else int(array.nbytes)
