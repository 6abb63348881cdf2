"""A block owner's part in writing datasets: fill a chunk's home, write a region into it.

Both act only on an extent that is RESERVED, carries the id the YellowPages gave the
writer, and holds a dataset chunk (checked under the allocator lock, as frees and marks
are).  Where the chunk's data lies and what its type is come from the extent's own
header, never from the request: a late, stray or hostile request cannot write outside the
chunk, into a sealed variable, into another writer's insert, or into an extent freed and
reserved again.  The home stays RESERVED, so no compaction moves it, until its dataset
seals.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from datafabric import layout
from datafabric.errors import InvalidArgumentError, VariableUnavailableError
from datafabric.layout import ExtentState
from datafabric.names import is_chunk_name
from datafabric.types import from_datashape


def fill_extent(plugin: Any, shm_id: str, extent_offset: int, extent_id: int, value: bytes) -> dict:
    """Every element of a new chunk's home reads as the fill value before anyone writes."""
    segment, chunk = _chunk(plugin, shm_id, extent_offset, extent_id)
    if len(value) != chunk.dtype.itemsize:
        raise InvalidArgumentError(f"a fill value of {len(value)} bytes for elements of {chunk.dtype.itemsize}")
    if not value.strip(b"\0"):
        ctypes.memset(chunk.ctypes.data, 0, chunk.nbytes)
    elif chunk.size:
        chunk.reshape(-1).view(f"V{len(value)}")[...] = np.frombuffer(value, f"V{len(value)}")[0]
    return {}


def write_region(
    plugin: Any, shm_id: str, extent_offset: int, extent_id: int, region: list[tuple[int, int, int]], data: Any
) -> dict:
    """``chunk[region] = data`` for a writer on another node: ``region`` is a
    (start, stop, step) per dimension of the chunk, ``data`` the C-ordered elements."""
    _, chunk = _chunk(plugin, shm_id, extent_offset, extent_id)
    if len(region) != chunk.ndim:
        raise InvalidArgumentError(f"a region of {len(region)} dimensions for a chunk of {chunk.ndim}")
    target = chunk[tuple(slice(*r) for r in region)]
    values = np.frombuffer(memoryview(data).cast("B"), chunk.dtype)
    if values.size != target.size:
        raise InvalidArgumentError(f"{values.size} elements for a region of {target.size}")
    target[...] = values.reshape(target.shape)
    return {}


def _chunk(plugin: Any, shm_id: str, extent_offset: int, extent_id: int) -> tuple[Any, np.ndarray]:
    with plugin.lock:
        if not plugin._holds(shm_id, extent_offset, extent_id, {ExtentState.RESERVED}):
            raise VariableUnavailableError(
                f"no chunk being written at offset {extent_offset} of block {shm_id} on {plugin.worker.address}: "
                "its dataset was sealed or ended"
            )
        segment = plugin.blocks[shm_id].segment
        extent = layout.read_extent(segment.buf, extent_offset)
    if not is_chunk_name(extent.name):
        raise InvalidArgumentError(f"the extent at offset {extent_offset} of block {shm_id} is no dataset chunk")
    ftype = from_datashape(extent.type)
    return segment, np.ndarray(ftype.shape, ftype.dtype, buffer=segment.buf, offset=extent.data_offset)
