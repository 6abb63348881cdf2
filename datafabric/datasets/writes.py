"""The writer's side of the dataset write protocol (``yp/datasets.py`` has the rest).

One ``ds[sel] = values`` is one write ticket: ``dataset_begin_write`` names the chunks it
touches and gets their homes (made on this node for chunks nobody began before), the
bytes go into each home, then ``dataset_end_write``.  A home on this process's node is
written through its mapping with one copy; a home on another node gets its part from
the home's owner (``write_region``), worker to worker, never through the scheduler.

Overlapping writes resolve as in h5py: per element, the last write to land wins.  Two
writes in flight at once to the same elements leave one of the two values per element,
not a mix of bytes within an element of a numpy scalar type (each is stored by one copy
loop).  Writes from one process are in its program order.

``fill_chunks`` is one ticket for whole chunks, whose memory it hands to a function in
turn: an importer reads its file straight into shared memory, with no copy between.

A ticket names the chunks it writes **whole** (every element: a piece covering its
chunk, ``fill_chunks``' chunks).  A home the YellowPages makes for such a chunk is
placed without the fill pass (a second pass over fresh memory), and nobody else is
handed it until this ticket ends, saying which of them it wrote completely
(``complete``); the others are freed, so a chunk whose writer failed part-way reads as
the fill value, never as a part or as an earlier variable's bytes
(``docs/protocols.md``, "Unfilled homes").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.protocol import to_serialize

from datafabric.datasets.grid import chunk_shape, ravel
from datafabric.datasets.selection import Selection
from datafabric.errors import InvalidArgumentError, VariableUnavailableError
from datafabric.messages import ChunkHome
from datafabric.types import from_datashape

if TYPE_CHECKING:
    from datafabric.datasets.dataset import Dataset

_TICKETS = itertools.count()  # with the holder, names a ticket (next() is atomic across threads)


def write(ds: Dataset, sel: Selection, values: Any, *, once: bool = False) -> None:
    """``once``: a write-once ticket, refused (``ChunkWrittenError``) if any chunk it touches
    was written or claimed before (the YellowPages checks and claims in one step)."""
    try:
        data = np.broadcast_to(np.asarray(values, dtype=ds.dtype), sel.shape)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(
            f"values for {ds.name!r}{list(sel.shape)} of {ds.dtype} do not fit the selection: {exc}"
        ) from None
    data = sel.orient(data)  # its own inverse: values in the dataset's order
    pieces = list(sel.pieces(ds.chunks))
    if not pieces:
        return
    flats = [ravel(p.index, ds._grid) for p in pieces]
    whole = sorted(f for p, f in zip(pieces, flats, strict=True) if _covers(p.local, ds, p.index))
    fabric = ds._fabric
    ctx = fabric._ctx()
    ticket = str(next(_TICKETS))  # its end counts for this ticket only
    homes = ctx.call(
        "dataset_begin_write",
        name=ds.name,
        dataset_id=ds.id,
        flats=sorted(set(flats)),
        node=ctx.node,
        holder=ctx.holder,
        once=once,
        whole=whole,
        ticket=ticket,
    )
    done: list[int] = []
    try:
        by_flat = {h["flat"]: h for h in homes}
        for piece, flat in zip(pieces, flats, strict=True):
            _write_piece(fabric, ctx, by_flat[flat], piece.local, data[piece.out])
            done.append(flat)
    finally:
        _end(ctx, ds, ticket, done)


def fill_chunks(
    ds: Dataset, indices: list[tuple[int, ...]], fill: Callable[[np.ndarray, tuple[int, ...]], None]
) -> None:
    """Write chunks ``indices`` whole, in one write ticket (one round trip to begin it,
    one to end it, however many chunks): ``fill(view, index)`` writes every element of
    ``view``, the chunk's memory when this process maps its home, else a buffer then sent
    to the home's owner.  One chunk at a time, so one chunk's bytes at most are in this
    process's own memory; the chunks whose ``fill`` returned are confirmed complete, any
    others (an exception) read as the fill value."""
    fabric = ds._fabric
    ctx = fabric._ctx()
    flats = [ravel(index, ds._grid) for index in indices]
    ticket = str(next(_TICKETS))
    homes = ctx.call(
        "dataset_begin_write",
        name=ds.name,
        dataset_id=ds.id,
        flats=flats,
        node=ctx.node,
        holder=ctx.holder,
        whole=flats,
        ticket=ticket,
    )
    complete: list[int] = []
    try:
        by_flat = {h["flat"]: h for h in homes}
        for index, flat in zip(indices, flats, strict=True):
            home = by_flat[flat]
            chunk = _mapped_chunk(fabric, ctx, home)
            if chunk is not None:
                fill(chunk, index)
            else:
                ftype = from_datashape(home["type"])
                part = np.empty(ftype.shape, ftype.dtype)
                fill(part, index)
                _send_part(ctx, home, tuple(slice(0, n, 1) for n in ftype.shape), part)
            complete.append(flat)
    finally:
        _end(ctx, ds, ticket, complete)


def _end(ctx: Any, ds: Dataset, ticket: str, complete: list[int]) -> None:
    """End the ticket one-way, on this process's stream to the scheduler: no round trip.
    A seal or an end of the dataset waits for every ticket, so nothing needs the answer;
    in a task, the stream carries it before Dask hears the task finished."""
    msg = {"dataset_id": ds.id, "holder": ctx.holder, "ticket": ticket, "complete": complete}
    ctx.send({"op": "datafabric_dataset_end_write", **msg})


def _covers(local: tuple, ds: Dataset, index: tuple[int, ...]) -> bool:
    """Whether a piece takes every element of its chunk (an int only one of a length 1)."""
    shape = chunk_shape(index, ds.shape, ds.chunks)
    return all(
        len(range(*k.indices(n))) == n if isinstance(k, slice) else n == 1 for k, n in zip(local, shape, strict=True)
    )


def _write_piece(fabric: Any, ctx: Any, home: ChunkHome, local: tuple, part: np.ndarray) -> None:
    chunk = _mapped_chunk(fabric, ctx, home)
    if chunk is not None:
        chunk[local] = part
    else:
        _send_part(ctx, home, local, part)


def _mapped_chunk(fabric: Any, ctx: Any, home: ChunkHome) -> np.ndarray | None:
    """The home's memory through this process's mapping, None if it cannot map it."""
    if not (ctx.node is None or ctx.node == home["node"]):
        return None
    segment = fabric._state.segment(home["node"], home["shm_id"])
    if segment is None:
        return None
    ftype = from_datashape(home["type"])
    return np.ndarray(ftype.shape, ftype.dtype, buffer=segment.buf, offset=home["data_offset"])


def _send_part(ctx: Any, home: ChunkHome, local: tuple, part: np.ndarray) -> None:
    if home["worker"] is None:
        raise VariableUnavailableError(f"the chunk's node {home['node']} has no live worker now; write it again later")
    region = [(s.start, s.stop, s.step) if isinstance(s, slice) else (s, s + 1, 1) for s in local]
    ctx.call_worker(
        home["worker"],
        "write_region",
        shm_id=home["shm_id"],
        extent_offset=home["extent_offset"],
        extent_id=home["extent_id"],
        region=region,
        data=to_serialize(np.ascontiguousarray(part)),
    )
