"""The on-memory format of a block: the contract between every process (and language).

A block is one POSIX shared-memory segment::

    [block header, BLOCK_HEADER_SIZE bytes][extent][extent]...[extent]  (up to the block's end)

Block header (little endian): magic ``b"DFABRIC\\0"``, layout version (u32), header size
(u32), block size (u64), block uuid (16 bytes), fabric id (16 bytes), node id length (u16),
node id (UTF-8).  Extents tile the rest of the block with no gap, so walking them from the
first one rebuilds the allocator.  Each extent::

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

Changing any of this means bumping LAYOUT_VERSION.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

LAYOUT_VERSION = 2
ALIGN = 64
PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20
BLOCK_MAGIC = b"DFABRIC\x00"
EXTENT_MAGIC = b"DFEX"
BLOCK_HEADER_SIZE = 512

_BLOCK_FIXED = struct.Struct("<8sIIQ16s16sH")
_EXTENT_FIXED = struct.Struct("<4sIQQQIIII")
MAX_NODE_BYTES = BLOCK_HEADER_SIZE - _BLOCK_FIXED.size
MIN_EXTENT = -(-_EXTENT_FIXED.size // ALIGN) * ALIGN


class ExtentState(IntEnum):
    FREE = 0
    RESERVED = 1  # being written; invisible, reclaimed if its writer dies
    SEALED = 2  # visible and read-only
    DELETED = 3  # invisible; memory held until the last lease ends


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
    """Write an extent header with its metadata; return where its data starts in the block."""
    name_b, type_b, doc_b = name.encode(), type_.encode(), doc.encode()
    data_offset = data_offset_for(offset, name, type_, doc, data_size)
    if data_offset + data_size > size:
        raise ValueError(f"extent of {size} bytes cannot hold {data_offset + data_size}")
    _EXTENT_FIXED.pack_into(
        buf,
        offset,
        EXTENT_MAGIC,
        state,
        size,
        data_size,
        extent_id,
        data_offset,
        len(name_b),
        len(type_b),
        len(doc_b),
    )
    pos = offset + _EXTENT_FIXED.size
    for part in (name_b, type_b, doc_b):
        buf[pos : pos + len(part)] = part
        pos += len(part)
    return offset + data_offset


def set_state(buf: memoryview, offset: int, state: ExtentState) -> None:
    struct.pack_into("<I", buf, offset + 4, state)


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
    """Every extent of the block, in address order, free ones included."""
    end = read_block_header(buf).size if size is None else size
    offset = BLOCK_HEADER_SIZE
    while offset < end:
        extent = read_extent(buf, offset)
        yield extent
        offset += extent.size
