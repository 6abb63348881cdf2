"""Moving one extent down inside its block so that a SIGKILL at any instant loses nothing.

The protocol is the block's move journal, documented in ``datafabric/layout.py``: the
extent moves as one rigid byte range, copied from its low end in chunks no longer than the
shift (no chunk overwrites bytes not yet copied), with the bytes done recorded in the block
header after each chunk.  ``slide`` runs a move; ``roll_forward`` finishes one that a dead
owner left, and is what opening a block runs before walking it.

``stage_hook``, when set, is called at each step of a move with the step's name and the
journal; the crash tests set it in a child process to stop it at a chosen step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from datafabric import layout
from datafabric.layout import ExtentState, MoveJournal

# A move takes at most this many chunks: an extent whose shift is smaller than
# 1/MAX_CHUNKS of its size stays where it is (at most that fraction of it is left free).
MAX_CHUNKS = 64

stage_hook: Callable[[str, MoveJournal], None] | None = None


def shift_for(extent: layout.Extent, dest: int) -> int:
    """How far ``extent`` can slide down towards ``dest`` keeping its data's alignment,
    or 0 if that shift is not worth its chunks."""
    to = layout.PAGE if extent.data_size >= layout.PAGE_ALIGN_FROM else layout.ALIGN
    shift = (extent.offset - dest) // to * to
    return shift if shift and -(-extent.size // shift) <= MAX_CHUNKS else 0


def slide(buf: memoryview, address: int, free_offset: int, source: int, length: int, shift: int) -> None:
    """Move the extent at ``source`` down by ``shift`` into the FREE extent that starts at
    ``free_offset`` and ends at ``source``.  Leaves ``[source - shift + length, source +
    length)`` as a FREE extent (not yet merged with a free neighbour)."""
    dest = source - shift
    if free_offset < dest:  # step 1: the FREE extent is split at dest (two valid tilings)
        layout.write_extent(buf, dest, ExtentState.FREE, shift)
        layout.write_extent(buf, free_offset, ExtentState.FREE, dest - free_offset)
    journal = MoveJournal(source, dest, length, min(shift, length), 0)
    _stage("split", journal)
    layout.begin_move(buf, source, dest, length, journal.chunk)
    _finish(buf, address, journal)


def roll_forward(buf: memoryview, address: int) -> MoveJournal | None:
    """Finish the move a dead owner left in this block, if any; return what it was."""
    journal = layout.read_journal(buf)
    if journal is not None:
        _finish(buf, address, journal)
    return journal


def _finish(buf: memoryview, address: int, journal: MoveJournal) -> None:
    """Steps 3 and 4 from ``journal.done`` on: idempotent, so a roll-forward may redo
    what a killed move had done already."""
    _stage("begun", journal)
    source, dest, length, chunk = journal.source, journal.dest, journal.length, journal.chunk
    for start in range(journal.done, length, chunk):
        n = min(chunk, length - start)
        _stage("chunk", journal)
        ctypes.memmove(address + dest + start, address + source + start, n)
        _stage("copied", journal)
        layout.record_progress(buf, start + n)
        journal = MoveJournal(source, dest, length, chunk, start + n)
        _stage("progress", journal)
    layout.write_extent(buf, dest + length, ExtentState.FREE, source - dest)
    _stage("freed", journal)
    layout.end_move(buf)
    _stage("ended", journal)


def _stage(name: str, journal: MoveJournal) -> None:
    if stage_hook is not None:
        stage_hook(name, journal)
