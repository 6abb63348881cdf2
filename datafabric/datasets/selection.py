"""numpy-style selections of a dataset, split over the chunks they touch.

Taken: ints (negative from the end), slices with any non-zero step, one ``...``, and
``()``.  A selection is reduced to a positive-step range per dimension, plus the
dimensions that an int drops and those a negative step reverses: the reversal is a
view of the result, so it costs no copy.  Everything else (arrays, booleans, ``None``)
is refused with ``InvalidSelectionError``, rather than guessed at.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from numbers import Integral
from typing import NamedTuple

from datafabric.errors import InvalidSelectionError


class Range(NamedTuple):
    """Elements ``start, start + step, ...`` (``count`` of them) of one dimension;
    ``dropped``: an int selected it, so the result has no such dimension."""

    start: int
    step: int
    count: int
    dropped: bool = False
    reversed: bool = False


class Piece(NamedTuple):
    """Part of a selection inside one chunk: the chunk's grid index, what to take of the
    chunk, and where it goes in the (unreversed) result."""

    index: tuple[int, ...]
    local: tuple[int | slice, ...]
    out: tuple[slice, ...]


class Selection:
    def __init__(self, key: object, shape: tuple[int, ...]) -> None:
        self.ranges = _ranges(key, shape)
        self.shape = tuple(r.count for r in self.ranges if not r.dropped)  # the result's shape
        self.reversed = any(r.reversed for r in self.ranges)

    def pieces(self, chunks: tuple[int, ...]) -> Iterator[Piece]:
        per_dim = [list(_split(r, c)) for r, c in zip(self.ranges, chunks, strict=True)]
        for parts in itertools.product(*per_dim):
            yield Piece(
                tuple(p[0] for p in parts), tuple(p[1] for p in parts), tuple(p[2] for p in parts if p[2] is not None)
            )

    def orient(self, array: object) -> object:
        """The result in the order asked for: dimensions a negative step selected are
        reversed (a view)."""
        flips = tuple(slice(None, None, -1) if r.reversed else slice(None) for r in self.ranges if not r.dropped)
        return array[flips] if any(r.reversed for r in self.ranges) else array


def _split(r: Range, c: int) -> Iterator[tuple[int, int | slice, slice]]:
    """(chunk index, what to take in the chunk, where it goes) along one dimension."""
    if r.count == 0:
        return
    last = r.start + (r.count - 1) * r.step
    for k in range(r.start // c, last // c + 1):
        lo, hi = k * c, (k + 1) * c
        i0 = max(0, -(-(lo - r.start) // r.step))
        i1 = min(r.count, -(-(hi - r.start) // r.step))
        if i0 >= i1:
            continue  # a step longer than a chunk skips it
        first = r.start + i0 * r.step - lo
        if r.dropped:
            yield k, first, None
        else:
            yield k, slice(first, first + (i1 - i0 - 1) * r.step + 1, r.step), slice(i0, i1)


def _ranges(key: object, shape: tuple[int, ...]) -> list[Range]:
    items = key if isinstance(key, tuple) else (key,)
    ellipses = sum(1 for k in items if k is Ellipsis)
    if ellipses > 1:
        raise InvalidSelectionError("a selection may hold one '...' only")
    explicit = len(items) - ellipses
    if explicit > len(shape):
        raise InvalidSelectionError(f"{explicit} indices given for a dataset of {len(shape)} dimensions")
    expanded: list[object] = []
    for k in items:
        expanded += [slice(None)] * (len(shape) - explicit) if k is Ellipsis else [k]
    expanded += [slice(None)] * (len(shape) - len(expanded))
    return [_range(k, n, axis) for axis, (k, n) in enumerate(zip(expanded, shape, strict=True))]


def _range(k: object, n: int, axis: int) -> Range:
    if type(k) is slice:  # exact type checks first: this is every read's hot path
        if not all(part is None or type(part) is int or _is_int(part) for part in (k.start, k.stop, k.step)):
            raise InvalidSelectionError(f"slice {k} on axis {axis}: its parts must be ints or None")
        if k.step == 0:
            raise InvalidSelectionError(f"slice {k} on axis {axis} has step 0")
        start, stop, step = k.indices(n)
        count = len(range(start, stop, step))
        if step > 0 or count == 0:
            return Range(start if count else 0, abs(step), count)
        return Range(start + (count - 1) * step, -step, count, reversed=True)
    if type(k) is int or _is_int(k):
        i = int(k) + n if k < 0 else int(k)
        if not 0 <= i < n:
            raise InvalidSelectionError(f"index {k} is out of range for axis {axis} of length {n}")
        return Range(i, 1, 1, dropped=True)
    raise InvalidSelectionError(
        f"{k!r} on axis {axis} is not a selection datasets take: use ints, slices (with steps), '...' or ()"
    )


def _is_int(k: object) -> bool:
    return isinstance(k, Integral) and not isinstance(k, bool)
