"""First-fit allocation of extents inside one block, kept in the block itself.

Every extent, free ones included, has its header in shared memory, so the allocator's
state can always be rebuilt by walking the block (after a crash, or by another worker that
adopts the block).  The in-process index is a sorted list of extent offsets with their
sizes and states, and a sorted list of the free ones; ``reserve`` scans the free ones for
the first that fits and splits off the rest, ``free`` coalesces a freed extent with free
neighbours, so no two free extents are ever adjacent once a call returns.  Worst case per call: O(free extents) for the scan plus O(extents) for a
list insertion (a memmove); filling a block with small variables keeps one free extent,
so that case stays flat however many variables the block holds.

Crash safety: every change of the block's headers leaves a block that a walk reads as a
valid tiling, except a move, whose state is the block's move journal (``layout.py``).
Opening a block that is not fresh therefore first rolls an interrupted move forward
(``moves.roll_forward``), then walks it, merging free extents that a killed owner left
side by side.  What a reader may assume: an extent that is not FREE holds exactly the
bytes its writer sealed, at whichever offset the last finished move left it, and keeps its
``extent_id`` wherever it moves.
"""

from __future__ import annotations

import bisect
import ctypes
import secrets
from dataclasses import dataclass

from datafabric import layout
from datafabric.layout import ExtentState
from worker_plugin import moves


@dataclass(frozen=True)
class Reservation:
    offset: int  # of the extent header
    data_offset: int
    size: int
    extent_id: int


class BlockAllocator:
    def __init__(self, buf: memoryview, size: int, *, fresh: bool) -> None:
        self._buf = buf
        self.size = size
        self._offsets: list[int] = []
        self._extents: dict[int, tuple[int, ExtentState]] = {}
        self._free: list[int] = []  # offsets of the FREE extents, sorted
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
        self._offsets, self._extents, self._free = [], {}, []
        for extent in layout.walk(self._buf, self.size):
            last = self._offsets[-1] if self._offsets else None
            if extent.state is ExtentState.FREE and last is not None and self._extents[last][1] is ExtentState.FREE:
                size = self._extents[last][0] + extent.size
                layout.write_extent(self._buf, last, ExtentState.FREE, size)
                self._extents[last] = (size, ExtentState.FREE)
                continue
            self._offsets.append(extent.offset)
            self._record(extent.offset, extent.size, extent.state)

    def reserve(self, name: str, type_: str, doc: str, data_size: int) -> Reservation | None:
        for offset in self._free:
            size = self._extents[offset][0]
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
        size, _ = self._extents[offset]
        layout.set_state(self._buf, offset, state)
        self._record(offset, size, state)

    def free(self, offset: int) -> int:
        """Free the extent at ``offset``, merge it with free neighbours; return its size."""
        size, state = self._extents[offset]
        if state is ExtentState.FREE:
            raise ValueError(f"extent at {offset} is free already")
        freed = size
        i = bisect.bisect_left(self._offsets, offset)
        if i + 1 < len(self._offsets):
            nxt = self._offsets[i + 1]
            nsize, nstate = self._extents[nxt]
            if nstate is ExtentState.FREE:
                size += nsize
                self._drop(i + 1)
        if i > 0:
            prev = self._offsets[i - 1]
            psize, pstate = self._extents[prev]
            if pstate is ExtentState.FREE:
                self._drop(i)
                offset, size = prev, psize + size
        layout.write_extent(self._buf, offset, ExtentState.FREE, size)
        self._record(offset, size, ExtentState.FREE)
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
        for offset in list(self._offsets):
            size, state = self._extents[offset]
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
        return [(o, *self._extents[o]) for o in self._offsets]

    def state_of(self, offset: int) -> ExtentState | None:
        entry = self._extents.get(offset)
        return entry[1] if entry else None

    @property
    def free_bytes(self) -> int:
        return sum(self._extents[o][0] for o in self._free)

    @property
    def largest_free(self) -> int:
        return max((self._extents[o][0] for o in self._free), default=0)

    @property
    def capacity(self) -> int:
        return self.size - layout.BLOCK_HEADER_SIZE

    def _put(self, offset: int, size: int, state: ExtentState) -> None:
        layout.write_extent(self._buf, offset, state, size)
        bisect.insort(self._offsets, offset)
        self._record(offset, size, state)

    def _record(self, offset: int, size: int, state: ExtentState) -> None:
        """The one place the index changes: the extent and whether it is free."""
        was_free = offset in self._extents and self._extents[offset][1] is ExtentState.FREE
        self._extents[offset] = (size, state)
        if state is ExtentState.FREE and not was_free:
            bisect.insort(self._free, offset)
        elif was_free and state is not ExtentState.FREE:
            del self._free[bisect.bisect_left(self._free, offset)]

    def _drop(self, index: int) -> None:
        offset = self._offsets.pop(index)
        if self._extents.pop(offset)[1] is ExtentState.FREE:
            del self._free[bisect.bisect_left(self._free, offset)]
