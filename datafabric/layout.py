"""The on-memory format of a block: the contract between every process (and language).

A block is one POSIX shared-memory segment::

    [block header, BLOCK_HEADER_SIZE bytes][extent][extent]...[extent]  (up to the block's end)

Block header (little endian): magic ``b"DFABRIC\\0"``, layout version (u32), header size
(u32), block size (u64), block uuid (16 bytes), fabric id (16 bytes), node id length (u16),
node id (UTF-8); at JOURNAL_OFFSET, the move journal (below).  Extents tile the rest of the
block with no gap, so walking them from the first one rebuilds the allocator.  Each extent::

    [magic b"DFEX", state u32, extent size u64, data size u64, extent id u64,
     data offset u32, name length u32, type length u32, doc length u32]
    [name][type][doc][pad][data][pad]

The ``extent id`` is drawn at random when the extent is reserved and travels with it
when it moves, so that the directory can find a variable's copy again after a move
whose report was lost (its owner died mid-compaction); a FREE extent has id 0.

``data offset`` is relative to the extent; extents and their sizes are ALIGN-aligned, and
data starts ALIGN-aligned in the block, or page-aligned for data of PAGE_ALIGN_FROM bytes
or more (large copies run up to twice as fast into a page-aligned destination).  ``type`` is the
canonical ndtypes string.  Free space is itself an extent in state FREE.

Move journal (at JOURNAL_OFFSET in the block header): state u32 (IDLE 0, MOVING 1),
reserved u32, source u64, dest u64, length u64, chunk u64, done u64.  Compaction moves an
extent as one rigid byte range (header, metadata and data) from ``source`` down to
``dest``, by a shift that is a multiple of its data's alignment, so its size and relative
data offset stay the same.  Only the block's owner writes the journal, in this order, each
step leaving a block that a walk after SIGKILL understands:

1. ``[dest, source)`` is made one FREE extent (a FREE header at ``dest`` first, then the
   FREE extent before it shrunk to end there): the tiling stays valid.
2. source, dest, length, chunk and done = 0 are written while the state is IDLE, then the
   state becomes MOVING (one aligned 4-byte store).
3. The range is copied from its low end in chunks of at most ``source - dest`` bytes, so no
   chunk overwrites bytes not yet copied; after each chunk ``done`` (one aligned 8-byte
   store) counts the bytes copied.  Bytes ``[done, length)`` of the source are intact at
   every instant, and copying them again is harmless.
4. After the last chunk, a FREE header at ``dest + length`` covers ``[dest + length,
   source + length)``; then the state becomes IDLE.

While the state is MOVING the block's tiling is unknown to a reader: ``walk`` refuses it.
Whoever opens the block to own it (``BlockAllocator(..., fresh=False)``) first rolls the
move forward: it copies ``[done, length)`` again and does step 4.  The moved extent then
reads exactly its old bytes at ``dest``; no extent ever holds a mixture.  A reader given
an offset by the directory reads nothing of a block being compacted: the YellowPages holds
those reads back, and re-learns offsets by extent id when an adopter rolled a move forward.

Changing any of this means bumping LAYOUT_VERSION.
"""

from __future__ import annotations

import struct
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

if sys.byteorder != "little":  # _store writes native integers into a little-endian format
    raise ImportError("datafabric's memory layout needs a little-endian machine")

LAYOUT_VERSION = 3
ALIGN = 64
PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20
BLOCK_MAGIC = b"DFABRIC\x00"
EXTENT_MAGIC = b"DFEX"
BLOCK_HEADER_SIZE = 512

_BLOCK_FIXED = struct.Struct("<8sIIQ16s16sH")
_EXTENT_FIXED = struct.Struct("<4sIQQQIIII")
_EXTENT_ID = struct.Struct("<Q")  # at byte 24 of _EXTENT_FIXED
JOURNAL_OFFSET = 448
_JOURNAL = struct.Struct("<IIQQQQQ")
_JOURNAL_DONE = JOURNAL_OFFSET + 40
MAX_NODE_BYTES = JOURNAL_OFFSET - _BLOCK_FIXED.size
MIN_EXTENT = -(-_EXTENT_FIXED.size // ALIGN) * ALIGN


class ExtentState(IntEnum):
    FREE = 0
    RESERVED = 1  # being written; invisible, reclaimed if its writer dies
    SEALED = 2  # visible and read-only
    DELETED = 3  # invisible; memory held until the last lease ends


class MoveState(IntEnum):
    IDLE = 0
    MOVING = 1


class LayoutError(ValueError):
    """The memory does not hold a block or an extent of this layout version."""


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class BlockHeader:
    block_uuid: uuid.UUID
    fabric_id: uuid.UUID
    node: str
    size: int


@dataclass(frozen=True)
class Extent:
    offset: int  # of the extent header, in the block
    state: ExtentState
    size: int
    data_size: int
    data_offset: int  # in the block
    extent_id: int
    name: str
    type: str
    doc: str


def write_block_header(buf: memoryview, header: BlockHeader) -> None:
    node = header.node.encode()
    if len(node) > MAX_NODE_BYTES:
        raise ValueError(f"node id longer than {MAX_NODE_BYTES} bytes: {header.node!r}")
    _BLOCK_FIXED.pack_into(
        buf,
        0,
        BLOCK_MAGIC,
        LAYOUT_VERSION,
        BLOCK_HEADER_SIZE,
        header.size,
        header.block_uuid.bytes,
        header.fabric_id.bytes,
        len(node),
    )
    buf[_BLOCK_FIXED.size : _BLOCK_FIXED.size + len(node)] = node
    _JOURNAL.pack_into(buf, JOURNAL_OFFSET, MoveState.IDLE, 0, 0, 0, 0, 0, 0)


def read_block_header(buf: memoryview) -> BlockHeader:
    if len(buf) < BLOCK_HEADER_SIZE:
        raise LayoutError(f"{len(buf)} bytes is too small to be a block")
    magic, version, header_size, size, block_uuid, fabric_id, node_len = _BLOCK_FIXED.unpack_from(buf)
    if magic != BLOCK_MAGIC or header_size != BLOCK_HEADER_SIZE:
        raise LayoutError("not a datafabric block (bad magic)")
    if version != LAYOUT_VERSION:
        raise LayoutError(f"block layout version {version}, this code reads {LAYOUT_VERSION}")
    node = bytes(buf[_BLOCK_FIXED.size : _BLOCK_FIXED.size + node_len]).decode()
    return BlockHeader(uuid.UUID(bytes=block_uuid), uuid.UUID(bytes=fabric_id), node, size)


def data_offset_for(offset: int, name: str, type_: str, doc: str, data_size: int) -> int:
    """Bytes from the start of an extent at ``offset`` to its data: fixed header,
    metadata, padding up to the data's alignment."""
    meta = len(name.encode()) + len(type_.encode()) + len(doc.encode())
    to = PAGE if data_size >= PAGE_ALIGN_FROM else ALIGN
    return align_up(offset + _EXTENT_FIXED.size + meta, to) - offset


def extent_size_for(offset: int, name: str, type_: str, doc: str, data_size: int) -> int:
    return align_up(data_offset_for(offset, name, type_, doc, data_size) + data_size)


def write_extent(
    buf: memoryview,
    offset: int,
    state: ExtentState,
    size: int,
    name: str = "",
    type_: str = "",
    doc: str = "",
    data_size: int = 0,
    extent_id: int = 0,
) -> int:
    """Write an extent header with its metadata; return where its data starts in the block.

    Safe against SIGKILL when it rewrites a header a walk can reach: state and size change
    each in one store, the other fields only while the state is FREE (whose other fields
    nobody reads).  So a FREE extent's state is stored first, then the rest, then its size;
    any other extent's fields come first, then its size, then its state."""
    name_b, type_b, doc_b = name.encode(), type_.encode(), doc.encode()
    data_offset = data_offset_for(offset, name, type_, doc, data_size)
    if data_offset + data_size > size:
        raise ValueError(f"extent of {size} bytes cannot hold {data_offset + data_size}")
    header = bytearray(_EXTENT_FIXED.size)
    _EXTENT_FIXED.pack_into(
        header, 0, EXTENT_MAGIC, state, size, data_size, extent_id, data_offset, len(name_b), len(type_b), len(doc_b)
    )
    if state == ExtentState.FREE:
        _store(buf, offset + 4, "I", state)
    buf[offset : offset + 4] = header[:4]
    buf[offset + 16 : offset + _EXTENT_FIXED.size] = header[16:]
    pos = offset + _EXTENT_FIXED.size
    for part in (name_b, type_b, doc_b):
        buf[pos : pos + len(part)] = part
        pos += len(part)
    _store(buf, offset + 8, "Q", size)
    if state != ExtentState.FREE:
        _store(buf, offset + 4, "I", state)
    return offset + data_offset


def set_state(buf: memoryview, offset: int, state: ExtentState) -> None:
    _store(buf, offset + 4, "I", state)


def grow_free(buf: memoryview, offset: int, size: int) -> None:
    """A FREE extent takes in the extents after it, up to ``size`` bytes: one store of its
    size, so a walk sees either the old tiling or the new one."""
    _store(buf, offset + 8, "Q", size)


def extent_id_at(buf: memoryview, offset: int) -> int:
    """The ``extent_id`` in the header at ``offset``, without decoding the rest."""
    return _EXTENT_ID.unpack_from(buf, offset + 24)[0]


def read_extent(buf: memoryview, offset: int) -> Extent:
    magic, state, size, data_size, extent_id, data_offset, name_len, type_len, doc_len = _EXTENT_FIXED.unpack_from(
        buf, offset
    )
    if magic != EXTENT_MAGIC or size < MIN_EXTENT or size % ALIGN or offset + size > len(buf):
        raise LayoutError(f"no valid extent at offset {offset}")
    pos = offset + _EXTENT_FIXED.size
    meta = bytes(buf[pos : pos + name_len + type_len + doc_len])
    return Extent(
        offset=offset,
        state=ExtentState(state),
        size=size,
        data_size=data_size,
        data_offset=offset + data_offset,
        extent_id=extent_id,
        name=meta[:name_len].decode(),
        type=meta[name_len : name_len + type_len].decode(),
        doc=meta[name_len + type_len :].decode(),
    )


def walk(buf: memoryview, size: int | None = None) -> Iterator[Extent]:
    """Every extent of the block, in address order, free ones included.  Refused while a
    move is in progress: the tiling is known only once the move is rolled forward."""
    end = read_block_header(buf).size if size is None else size
    journal = read_journal(buf)
    if journal is not None:
        raise LayoutError(
            f"a move of {journal.length} bytes from offset {journal.source} to {journal.dest} is unfinished; "
            "the block's owner finishes it when it opens the block"
        )
    offset = BLOCK_HEADER_SIZE
    while offset < end:
        extent = read_extent(buf, offset)
        yield extent
        offset += extent.size


@dataclass(frozen=True)
class MoveJournal:
    """A move in progress: ``length`` bytes from ``source`` down to ``dest``, ``done`` of
    them copied so far, in chunks of ``chunk`` bytes."""

    source: int
    dest: int
    length: int
    chunk: int
    done: int


def read_journal(buf: memoryview) -> MoveJournal | None:
    """The move in progress, or None.  A journal that breaks the rules a writer keeps is
    refused: rolling it forward would write where no move ever wrote."""
    state, _, source, dest, length, chunk, done = _JOURNAL.unpack_from(buf, JOURNAL_OFFSET)
    if state == MoveState.IDLE:
        return None
    shift = source - dest
    if (
        state != MoveState.MOVING
        or dest < BLOCK_HEADER_SIZE
        or shift <= 0
        or shift % ALIGN
        or length < MIN_EXTENT
        or source + length > len(buf)
        or not 0 < chunk <= shift
        or done > length
        or (done % chunk and done != length)
    ):
        raise LayoutError(
            f"corrupt move journal (state {state}, source {source}, dest {dest}, length {length}, "
            f"chunk {chunk}, done {done})"
        )
    return MoveJournal(source, dest, length, chunk, done)


def begin_move(buf: memoryview, source: int, dest: int, length: int, chunk: int) -> None:
    """Step 2: the fields while IDLE, then MOVING in one store."""
    _JOURNAL.pack_into(buf, JOURNAL_OFFSET, MoveState.IDLE, 0, source, dest, length, chunk, 0)
    _store(buf, JOURNAL_OFFSET, "I", MoveState.MOVING)


def record_progress(buf: memoryview, done: int) -> None:
    _store(buf, _JOURNAL_DONE, "Q", done)


def end_move(buf: memoryview) -> None:
    _store(buf, JOURNAL_OFFSET, "I", MoveState.IDLE)


def _store(buf: memoryview, offset: int, fmt: str, value: int) -> None:
    """One aligned store of a native integer (memoryview item assignment is a single
    ``memcpy`` of its size, which compiles to one store): a SIGKILL cannot tear it, where
    ``struct.pack_into("<Q")`` writes byte by byte."""
    buf[offset : offset + struct.calcsize(fmt)].cast(fmt)[0] = value
