"""Caterva2's slice syntax for ``GET data/{name}?slice=``, and how to read a selection in
pieces so that no read ever holds the whole of a large variable.

``0:10,5`` is ``[0:10, 5]``: comma-separated parts, one per leading axis, each an integer
(negative counts from the end) or ``start:stop:step`` with any part left out.  Axes not
named are taken whole.  The text comes from a URL and is parsed by hand, never evaluated.

A selection is read as **pieces**: byte ranges of the variable, each turned into part of
the answer by ``Piece.take``.  A selection that is one contiguous byte range (leading
integers, one step-1 slice, then whole axes: a row, a run of rows, the whole variable) is
read in ranges of at most ``chunk`` bytes whatever its shape.  Any other selection is read
in runs of rows of the first axis (at most ``chunk`` bytes each, or one row if a row is
larger), each narrowed by the rest of the selection.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from datafabric.errors import InvalidArgumentError

MAX_SLICE_TEXT = 1024


def parse_slice(text: str | None, ndim: int) -> tuple[int | slice, ...]:
    """The numpy index of a ``slice=`` parameter (``None`` or ``""``: everything)."""
    if text is None or text.strip() == "":
        return ()
    if len(text) > MAX_SLICE_TEXT:
        raise _bad(text[:40] + "...", f"longer than {MAX_SLICE_TEXT} characters")
    parts = text.split(",")
    if len(parts) > ndim:
        raise _bad(text, f"{len(parts)} parts for a variable of {ndim} dimension(s)")
    return tuple(_part(text, p.strip()) for p in parts)


def _part(text: str, part: str) -> int | slice:
    if ":" not in part:
        return _integer(text, part, allow_empty=False)
    bounds = part.split(":")
    if len(bounds) > 3:
        raise _bad(text, f"{part!r} has more than two colons")
    start, stop, step = ([_integer(text, b.strip()) for b in bounds] + [None, None])[:3]
    if step == 0:
        raise _bad(text, "a step of 0")
    return slice(start, stop, step)


def _integer(text: str, s: str, allow_empty: bool = True) -> int | None:
    if s == "" and allow_empty:
        return None
    digits = s[1:] if s[:1] in "+-" else s
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        raise _bad(text, f"{s!r} is not an integer or start:stop:step")
    return int(s)


def _bad(text: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"bad slice {text!r}: {why}; write it as Caterva2 does, e.g. slice=0:10,5 or slice=::2")


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, start + nbytes)`` of the variable and how they become answer bytes."""

    start: int
    nbytes: int
    shape: tuple[int, ...] = ()  # of the rows read, when they are narrowed (empty: taken as they are)
    index: tuple = ()

    def take(self, data: memoryview | bytes, dtype: np.dtype) -> bytes | memoryview:
        if not self.shape:
            return data
        rows = np.frombuffer(data, dtype=dtype).reshape(self.shape)
        return np.ascontiguousarray(rows[self.index]).data.cast("B")


@dataclass(frozen=True)
class Selection:
    shape: tuple[int, ...]  # of the answer
    nbytes: int
    pieces: list[Piece]


def select(shape: tuple[int, ...], dtype: np.dtype, index: tuple, chunk: int) -> Selection:
    """How to read ``array[index]`` of an array of ``shape`` in pieces of about ``chunk`` bytes."""
    itemsize = dtype.itemsize
    full = tuple(index) + (slice(None),) * (len(shape) - len(index))
    try:
        bounds = [_bound(i, n, axis) for axis, (i, n) in enumerate(zip(full, shape, strict=True))]
    except IndexError as exc:
        raise InvalidArgumentError(f"bad slice: {exc}; the shape is {shape}") from None
    out_shape = tuple(len(r) for r, is_int in bounds if not is_int)
    nbytes = math.prod(out_shape) * itemsize
    if nbytes == 0:
        return Selection(out_shape, 0, [])
    run = _contiguous(bounds, shape, itemsize)
    if run is not None:
        start, length = run
        pieces = [Piece(start + k, min(chunk, length - k)) for k in range(0, length, chunk)]
        return Selection(out_shape, nbytes, pieces)
    return Selection(out_shape, nbytes, list(_row_pieces(bounds, shape, itemsize, chunk)))


def _bound(i: int | slice, n: int, axis: int) -> tuple[range, bool]:
    if isinstance(i, slice):
        return range(n)[i], False
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for axis {axis} of size {n}")
    return range(i % n, i % n + 1), True


def _contiguous(bounds: list[tuple[range, bool]], shape: tuple[int, ...], itemsize: int) -> tuple[int, int] | None:
    """(first byte, length) when the selection is one contiguous byte range."""
    axis = len(shape)
    while axis > 0 and bounds[axis - 1][0] == range(shape[axis - 1]):
        axis -= 1  # trailing axes taken whole
    if axis > 0:
        r, _ = bounds[axis - 1]
        if len(r) > 1 and r.step != 1:
            return None
        axis -= 1  # one run along this axis
        if any(len(r) != 1 for r, _ in bounds[:axis]):
            return None
    strides = [math.prod(shape[k + 1 :]) * itemsize for k in range(len(shape))]
    start = sum(r[0] * s for (r, _), s in zip(bounds, strides, strict=True))
    length = math.prod(len(r) for r, _ in bounds) * itemsize
    return start, length


def _row_pieces(bounds: list[tuple[range, bool]], shape: tuple[int, ...], itemsize: int, chunk: int) -> Iterator[Piece]:
    """Runs of the selected rows of axis 0 (ascending or descending), each read as the span
    of rows it covers and narrowed by the rest of the selection."""
    rows, row_is_int = bounds[0]
    row_bytes = math.prod(shape[1:]) * itemsize
    rest = tuple(r[0] if is_int else _as_slice(r) for r, is_int in bounds[1:])
    step = rows.step
    per_run = max(1, chunk // max(1, row_bytes * abs(step)))
    for k in range(0, len(rows), per_run):
        run = rows[k : k + per_run]
        low, high = min(run[0], run[-1]), max(run[0], run[-1])
        span = high - low + 1
        first = run[0] - low
        row_index = first if row_is_int else _as_slice(range(first, first + len(run) * step, step))
        yield Piece(low * row_bytes, span * row_bytes, (span, *shape[1:]), (row_index, *rest))


def _as_slice(r: range) -> slice:
    """The slice that selects ``r`` (a range going down to 0 stops at None, not -1)."""
    return slice(r.start, r.stop if r.stop >= 0 else None, r.step)
