"""First-fit allocation of extents inside one block, kept in the block itself.

Every extent, free ones included, has its header in shared memory, so the allocator's
state can always be rebuilt by walking the block (after a crash, or by another worker that
adopts the block).  The in-process index is a dict of every extent's size and state by
offset (extents tile the block: the next one starts where one ends), a dict of the free
extents by where they end (the free neighbour before an extent) and a sorted list
(``sortedcontainers``) of the free ones; ``reserve`` scans the free ones for the first that
fits and splits off the rest, ``free`` coalesces a freed extent with free neighbours, so no
two free extents are ever adjacent once a call returns.  Cost per call: O(free extents) for
the scan plus O(log free extents) to change the index; filling a block with small
variables keeps one free extent, and freeing many of a block's extents costs O(1) dict
work each, so neither grows with the variables the block holds.  What the index keeps per
extent is plain ints in dicts, which Python's cyclic garbage collector never walks (a
sorted list of every offset was lists it walked in each full collection of the worker:
a block of a million extents made each one slower).  The
figures ``status`` reports (free bytes, largest free extent, extents per state) are kept
up to date with the index, O(1) to read.

Crash safety: every change of the block's headers leaves a block that a walk reads as a
valid tiling, except a move, whose state is the block's move journal (``layout.py``).
Opening a block that is not fresh therefore first rolls an interrupted move forward
(``moves.roll_forward``), then walks it, merging free extents that a killed owner left
side by side.  What a reader may assume: an extent that is not FREE holds exactly the
bytes its writer sealed, at whichever offset the last finished move left it, and keeps its
``extent_id`` wherever it moves.
"""

from __future__ import annotations

import ctypes
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from sortedcontainers import SortedList

from datafabric import layout, messages
from datafabric.layout import ExtentState
from worker_plugin import moves

_STATES = tuple(ExtentState)  # by value: the two low bits of an index entry
assert [int(st) for st in _STATES] == list(range(4))
_FREE = int(ExtentState.FREE)


@dataclass(frozen=True)
class Reservation:
    offset: int  # of the extent header
    data_offset: int
    size: int
    extent_id: int

    def message(self, shm_id: str) -> messages.Reservation:
        """As the block's owner tells the writer (``datafabric.messages``)."""
        return {
            "shm_id": shm_id,
            "extent_offset": self.offset,
            "data_offset": self.data_offset,
            "extent_size": self.size,
            "extent_id": self.extent_id,
        }


class BlockAllocator:
    def __init__(self, buf: memoryview, size: int, *, fresh: bool) -> None:
        self._buf = buf
        self.size = size
        # offset -> size << 2 | state, every extent: plain ints, so a dict Python's cyclic
        # garbage collector does not track.  A (size, ExtentState) tuple per extent was
        # tracked, and every full collection of the worker process walked them all: a task
        # inserting many names paid for a collection that grew with its block.
        self._extents: dict[int, int] = {}
        self._tally()
        if fresh:
            first = layout.BLOCK_HEADER_SIZE
            self._put(first, size - first, ExtentState.FREE)
        else:
            self.rebuild()

    def rebuild(self) -> None:
        """Re-read every extent header: the block, not this object, is the truth.  A move
        a dead owner left unfinished is finished first, and adjacent free extents (a
        killed owner had not merged them yet) become one."""
        moves.roll_forward(self._buf, ctypes.addressof(ctypes.c_char.from_buffer(self._buf)))
        self._extents = {}
        self._tally()
        last = None
        for extent in layout.walk(self._buf, self.size):
            if extent.state is ExtentState.FREE and last is not None and self._entry(last)[1] is ExtentState.FREE:
                size = self._entry(last)[0] + extent.size
                layout.write_extent(self._buf, last, ExtentState.FREE, size)
                self._record(last, size, ExtentState.FREE)
                continue
            self._record(extent.offset, extent.size, extent.state)
            last = extent.offset

    def reserve(self, name: str, type_: str, doc: str, data_size: int) -> Reservation | None:
        for offset in self._free:
            size = self._extents[offset] >> 2
            need = layout.extent_size_for(offset, name, type_, doc, data_size)
            if size >= need:
                break
        else:
            return None
        rest = size - need
        if rest >= layout.MIN_EXTENT:
            self._put(offset + need, rest, ExtentState.FREE)
            size = need
        extent_id = secrets.randbits(63) + 1
        data_offset = layout.write_extent(
            self._buf, offset, ExtentState.RESERVED, size, name, type_, doc, data_size, extent_id
        )
        self._record(offset, size, ExtentState.RESERVED)
        return Reservation(offset, data_offset, size, extent_id)

    def set_state(self, offset: int, state: ExtentState) -> None:
        size = self._extents[offset] >> 2
        layout.set_state(self._buf, offset, state)
        self._record(offset, size, state)

    def free(self, offset: int) -> int:
        """Free the extent at ``offset``, merge it with free neighbours; return its size."""
        return self.free_many([offset])

    def free_many(self, offsets: Iterable[int]) -> int:
        """Free the extents at ``offsets`` (none of them free); return the bytes freed.

        Each maximal run of neighbours that are freed or free already becomes one free
        extent with one header write: the free extent it starts with grows over the rest
        in one store (``layout.grow_free``), or its first extent is rewritten as a free one
        spanning the run (``layout.write_extent``: state, then size).  A walk after a kill
        at any instant sees each run either as it was or merged, as after a ``free`` of one
        extent.  Cost: O(1) dict work per extent (extents tile the block, so the next one
        is at ``offset + size``, and a free one before it ends at its offset), and
        O(log free extents) per free extent a run takes in."""
        todo = set(offsets)
        if any(self._extents[o] & 3 == _FREE for o in todo):
            bad = sorted(o for o in todo if self._extents[o] & 3 == _FREE)
            raise ValueError(f"extents at {bad[:5]} are free already")
        freed = 0
        for first in sorted(todo):
            if first not in todo:  # taken in by the run before
                continue
            start = self._free_ends.get(first, first)  # from the free extent before it, if any
            run, cur = [], start
            while cur < self.size:
                packed = self._extents[cur]
                if cur in todo:
                    todo.discard(cur)
                elif packed & 3 != _FREE:
                    break
                run.append((cur, packed))
                cur += packed >> 2
            freed += self._merge(run, cur - start)
        return freed

    def _merge(self, run: list[tuple[int, int]], size: int) -> int:
        """``run``'s extents (offset, index entry) become one free extent of ``size`` at the
        first one's offset: its header, then the index.  Returns the bytes newly freed."""
        start, head = run[0]
        if head & 3 == _FREE:
            layout.grow_free(self._buf, start, size)
        else:
            layout.write_extent(self._buf, start, ExtentState.FREE, size)
        freed = 0
        for offset, packed in run:
            extent_size, state = packed >> 2, packed & 3
            self._states[_STATES[state]] -= 1
            if state == _FREE:
                self._free_bytes -= extent_size
                self._free_sizes.remove(extent_size)
                del self._free_ends[offset + extent_size]
                if offset != start:
                    self._free.remove(offset)
            else:
                freed += extent_size
            if offset != start:
                del self._extents[offset]
        if head & 3 != _FREE:
            self._free.add(start)
        self._extents[start] = size << 2 | _FREE
        self._free_ends[start + size] = start
        self._count(size, ExtentState.FREE, +1)
        return freed

    def compact(self, movable: set[int], address: int) -> dict[int, tuple[int, int]]:
        """Slide the sealed extents in ``movable`` towards the block's start, past free
        space, never past a fixed extent (leased, reserved, deleted).  Returns
        ``{old extent offset: (new extent offset, new data offset)}``; a moved extent keeps
        its size.

        One left-to-right pass: each extent moves rigidly (``moves.slide``, journaled, safe
        against SIGKILL at any instant) by the largest shift that keeps its data aligned,
        if that shift is worth it (``moves.MAX_CHUNKS``).  Cost: one pass over the
        extents plus the bytes moved, in at most MAX_CHUNKS copies per extent."""
        moved: dict[int, tuple[int, int]] = {}
        cursor = layout.BLOCK_HEADER_SIZE  # where the free space before the next extent starts
        for offset in self._in_order():
            size, state = self._entry(offset)
            if state is ExtentState.FREE:
                continue
            if cursor < offset:  # the free extents in between become one
                layout.write_extent(self._buf, cursor, ExtentState.FREE, offset - cursor)
            if offset in movable and state is ExtentState.SEALED and cursor < offset:
                ext = layout.read_extent(self._buf, offset)
                shift = moves.shift_for(ext, cursor)
                if shift:
                    moves.slide(self._buf, address, cursor, offset, size, shift)
                    moved[offset] = (offset - shift, ext.data_offset - shift)
                    cursor = offset - shift + size
                    continue
            cursor = offset + size
        if cursor < self.size:
            layout.write_extent(self._buf, cursor, ExtentState.FREE, self.size - cursor)
        self.rebuild()
        return moved

    def extents(self) -> list[tuple[int, int, ExtentState]]:
        return [(o, *self._entry(o)) for o in self._in_order()]

    def _in_order(self) -> list[int]:
        """Every extent's offset in address order: they tile the block from its header on."""
        offsets, offset, extents = [], layout.BLOCK_HEADER_SIZE, self._extents
        while offset < self.size:
            offsets.append(offset)
            offset += extents[offset] >> 2
        return offsets

    def _entry(self, offset: int) -> tuple[int, ExtentState]:
        packed = self._extents[offset]
        return packed >> 2, _STATES[packed & 3]

    def state_of(self, offset: int) -> ExtentState | None:
        entry = self._extents.get(offset)
        return None if entry is None else _STATES[entry & 3]

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    @property
    def largest_free(self) -> int:
        return self._free_sizes[-1] if self._free_sizes else 0

    def __len__(self) -> int:
        return len(self._extents)

    def count(self, state: ExtentState) -> int:
        """Extents in ``state`` now; O(1)."""
        return self._states[state]

    @property
    def capacity(self) -> int:
        return self.size - layout.BLOCK_HEADER_SIZE

    def _put(self, offset: int, size: int, state: ExtentState) -> None:
        layout.write_extent(self._buf, offset, state, size)
        self._record(offset, size, state)

    def _tally(self) -> None:
        """The index of the free extents, and the figures ``status`` reports, kept up to
        date by every change of the index (``_record``, ``_merge``) so reading them costs
        O(1), not a walk of the extents."""
        self._free = SortedList()  # offsets of the FREE extents, for first fit
        self._free_ends: dict[int, int] = {}  # where each FREE extent ends -> its offset
        self._free_sizes = SortedList()  # sizes of the FREE extents
        self._free_bytes = 0
        self._states: Counter[ExtentState] = Counter()

    def _count(self, size: int, state: ExtentState, sign: int) -> None:
        self._states[state] += sign
        if state is ExtentState.FREE:
            self._free_bytes += sign * size
            if sign > 0:
                self._free_sizes.add(size)
            else:
                self._free_sizes.remove(size)

    def _record(self, offset: int, size: int, state: ExtentState) -> None:
        """The one place the index changes but for ``_merge``: the extent and whether it
        is free."""
        old = self._extents.get(offset)
        was_free = False
        if old is not None:
            old_size, old_state = old >> 2, _STATES[old & 3]
            self._count(old_size, old_state, -1)
            was_free = old_state is ExtentState.FREE
            if was_free and self._free_ends[offset + old_size] == offset:  # not if a split's rest ends there now
                del self._free_ends[offset + old_size]
        self._extents[offset] = size << 2 | state
        self._count(size, state, +1)
        if state is ExtentState.FREE:
            self._free_ends[offset + size] = offset
            if not was_free:
                self._free.add(offset)
        elif was_free:
            self._free.remove(offset)
