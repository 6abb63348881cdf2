"""A selection of a dataset read for ``GET data/``: assembled from the chunks it touches,
in **runs** along its first kept axis, so no run holds more than about ``PIECE`` bytes of
the answer (or one row of that axis, if a row is larger), whatever the selection's size.

Every written chunk the selection touches is leased in one step before the answer starts
(``Reads.acquire_many``, all or none, holder ``http-lease-<id>``) and released when the
response ends, however it ends: a dataset deleted mid-response frees its chunks only
after, and the answer is the dataset as it was sealed.  A chunk never written reads as
the fill value and is not leased (it has no memory).  Each chunk's rows are read as
``source.read_pieces`` reads a variable's: mapped when the scheduler is on the chunk's
node, else from its owner's ``read``.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from datafabric.datasets.grid import chunk_shape, grid_shape, ravel
from datafabric.datasets.selection import Range, Selection
from datafabric.messages import VariableInfo
from datafabric.names import chunk_name
from datafabric.types import from_datashape
from yp.dataset_table import DatasetRecord
from yp.http.leases import HOLDER_PREFIX
from yp.http.slices import Piece
from yp.http.source import read_pieces

if TYPE_CHECKING:
    from yp.plugin import YellowPages


@dataclass(frozen=True)
class DatasetSelection:
    """``record[index]``: the answer's shape and size, and the runs that make it."""

    record: DatasetRecord
    dtype: np.dtype
    selection: Selection
    axis: int | None  # the first axis the answer keeps (runs go along it); None: one element
    run_rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.selection.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def flats(self) -> list[int]:
        """The written chunks the selection touches."""
        grid = grid_shape(self.record.shape, self.record.chunks)
        touched = {ravel(p.index, grid) for p in self.selection.pieces(self.record.chunks)}
        table = self.record.table
        return sorted(f for f in touched if table[f] >= 0)

    def runs(self) -> list[tuple[Selection, tuple]]:
        """Each run as a selection of the dataset (positive steps) and the flips that put
        its block in the order asked for; in the answer's order."""
        ranges = self.selection.ranges
        if self.axis is None or not self.shape or 0 in self.shape:
            return [] if self.nbytes == 0 else [(self.selection, ())]
        along = ranges[self.axis]
        flips = tuple(slice(None, None, -1) if r.reversed else slice(None) for r in ranges if not r.dropped)
        out = []
        for i0 in range(0, along.count, self.run_rows):
            count = min(self.run_rows, along.count - i0)
            part = Range(along.start + i0 * along.step, along.step, count)
            key = tuple(_key(part if k == self.axis else r) for k, r in enumerate(ranges))
            out.append((Selection(key, self.record.shape), flips))
        return out[::-1] if along.reversed else out


def select_dataset(record: DatasetRecord, index: tuple, piece: int) -> DatasetSelection:
    dtype = from_datashape(record.element).dtype
    selection = Selection(index, record.shape)
    kept = [k for k, r in enumerate(selection.ranges) if not r.dropped]
    axis = kept[0] if kept else None
    row_bytes = math.prod(selection.shape[1:]) * dtype.itemsize
    return DatasetSelection(record, dtype, selection, axis, max(1, piece // max(1, row_bytes)))


def _key(r: Range) -> int | slice:
    return r.start if r.dropped else slice(r.start, r.start + (r.count - 1) * r.step + 1, r.step)


@contextlib.asynccontextmanager
async def leased_chunks(yp: YellowPages, chosen: DatasetSelection) -> AsyncIterator[dict[int, VariableInfo]]:
    """Leases on every written chunk ``chosen`` touches, for the block's length: the
    chunk variables' offsets by flat index."""
    flats = chosen.flats()
    holder = HOLDER_PREFIX + secrets.token_hex(16)
    dataset_id = chosen.record.dataset_id
    infos = await yp.reads.acquire_many([chunk_name(dataset_id, f) for f in flats], holder)
    try:
        yield dict(zip(flats, infos, strict=True))
    finally:
        for info in infos:
            yp.reads.release(info["var_id"], holder)


async def read_runs(
    yp: YellowPages, chosen: DatasetSelection, chunks: dict[int, VariableInfo]
) -> AsyncIterator[np.ndarray]:
    """The answer, run by run, each a C-contiguous array (the caller holds the leases)."""
    record = chosen.record
    grid = grid_shape(record.shape, record.chunks)
    fill = np.frombuffer(record.fillvalue, chosen.dtype)[0]
    for run, flips in chosen.runs():
        block = np.full(run.shape, fill, chosen.dtype)
        for p in run.pieces(record.chunks):
            info = chunks.get(ravel(p.index, grid))
            if info is None:
                continue  # never written: the fill value
            cshape = chunk_shape(p.index, record.shape, record.chunks)
            rows = _rows(p.local, cshape, chosen.dtype.itemsize)
            async with contextlib.aclosing(read_pieces(yp, info, [rows])) as pieces:
                async for piece, raw in pieces:
                    taken = np.frombuffer(piece.take(raw, chosen.dtype), chosen.dtype)
                    block[p.out] = taken.reshape(block[p.out].shape)
        yield np.ascontiguousarray(block[flips] if flips else block)


def _rows(local: tuple[int | slice, ...], cshape: tuple[int, ...], itemsize: int) -> Piece:
    """The bytes of a chunk that ``local`` needs, as one contiguous span: from the first
    to the last index of the first axis it keeps (the ints before it fix the row), then
    narrowed by ``local``."""
    strides = [math.prod(cshape[k + 1 :]) * itemsize for k in range(len(cshape))]
    axis = next((k for k, i in enumerate(local) if isinstance(i, slice)), len(local))
    start = sum(i * s for i, s in zip(local[:axis], strides, strict=False))
    if axis == len(local):
        return Piece(start, itemsize, (1,), (slice(0, 1),))
    first = local[axis]
    span = first.stop - first.start
    start += first.start * strides[axis]
    shape = (span, *cshape[axis + 1 :])
    return Piece(start, span * strides[axis], shape, (slice(0, span, first.step), *local[axis + 1 :]))
