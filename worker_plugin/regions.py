"""A block owner's part in writing datasets: fill a chunk's home, write a region into it.

Both act only on an extent that is RESERVED and carries the id the YellowPages gave the
writer (checked under the allocator lock, as frees and marks are): a late or stray
request never writes into a sealed variable or into an extent freed and reserved again.
The home stays RESERVED, and so is never moved by a compaction, until its dataset seals.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from datafabric.errors import VariableUnavailableError
from datafabric.layout import ExtentState
from datafabric.types import from_datashape


def fill_extent(
    plugin: Any, shm_id: str, extent_offset: int, extent_id: int, data_offset: int, nbytes: int, value: bytes
) -> dict:
    """Every element of a new chunk's home reads as the fill value before anyone writes."""
    segment = _reserved(plugin, shm_id, extent_offset, extent_id)
    if not value.strip(b"\0"):
        ctypes.memset(segment.address + data_offset, 0, nbytes)
    elif nbytes:
        items = np.frombuffer(segment.buf, f"V{len(value)}", nbytes // len(value), data_offset)
        items[...] = np.frombuffer(value, f"V{len(value)}")[0]
    return {}


def write_region(
    plugin: Any,
    shm_id: str,
    extent_offset: int,
    extent_id: int,
    data_offset: int,
    type: str,
    region: list[tuple[int, int, int]],
    data: Any,
) -> dict:
    """``chunk[region] = data`` for a writer on another node: ``region`` is a
    (start, stop, step) per dimension of the chunk, ``data`` the C-ordered bytes."""
    segment = _reserved(plugin, shm_id, extent_offset, extent_id)
    ftype = from_datashape(type)
    chunk = np.ndarray(ftype.shape, ftype.dtype, buffer=segment.buf, offset=data_offset)
    target = chunk[tuple(slice(*r) for r in region)]
    target[...] = np.frombuffer(memoryview(data).cast("B"), ftype.dtype).reshape(target.shape)
    return {}


def _reserved(plugin: Any, shm_id: str, extent_offset: int, extent_id: int) -> Any:
    with plugin.lock:
        if not plugin._holds(shm_id, extent_offset, extent_id, {ExtentState.RESERVED}):
            raise VariableUnavailableError(
                f"no chunk being written at offset {extent_offset} of block {shm_id} on {plugin.worker.address}: "
                "its dataset was sealed or ended"
            )
        return plugin.blocks[shm_id].segment
