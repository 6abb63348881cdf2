"""Bytes between processes: a variable copied to another block of this node, read by a
worker of another node, pulled from one, or streamed in by a writer that cannot map this
node's memory.  The YellowPages reserved the destination extent first; these handlers only
move bytes, so a failure midway leaves a reservation the directory frees, never a sealed
variable with wrong bytes.  A streamed write lands only in the extent it names, while that
extent is still reserved under the id its writer was given: a writer whose reservation
ended (it left the scheduler and the memory went to another variable) is refused.
"""

from __future__ import annotations

import asyncio
import ctypes
from typing import TYPE_CHECKING, Any

from distributed.protocol import to_serialize

from datafabric import layout
from datafabric.errors import InvalidArgumentError, NotOnThisNodeError, VariableUnavailableError
from datafabric.layout import ExtentState
from datafabric.protocol import CHUNKS_IN_FLIGHT, TRANSFER_CHUNK

if TYPE_CHECKING:
    from worker_plugin.plugin import FabricWorkerPlugin


async def copy_extent(
    plugin: FabricWorkerPlugin,
    shm_id: str,
    data_offset: int,
    nbytes: int,
    dest_node: str,
    dest_shm_id: str,
    dest_data_offset: int,
) -> dict:
    """Copy a variable's bytes into a reserved extent of another block of this node."""
    src = plugin.blocks[shm_id].segment
    dest = plugin.state.segment(dest_node, dest_shm_id)
    if dest is None:
        raise NotOnThisNodeError(f"block {dest_shm_id} of node {dest_node} cannot be mapped here")
    await asyncio.to_thread(ctypes.memmove, dest.address + dest_data_offset, src.address + data_offset, nbytes)
    return {}


def read(plugin: FabricWorkerPlugin, shm_id: str, data_offset: int, nbytes: int) -> dict:
    """Bytes of a block for another node; sent from the mapping, not copied here."""
    block = plugin.blocks.get(shm_id)
    if block is None:
        raise VariableUnavailableError(f"block {shm_id} is no longer on {plugin.worker.address}; get it again")
    return {"data": to_serialize(block.segment.buf[data_offset : data_offset + nbytes])}


async def fetch(
    plugin: FabricWorkerPlugin,
    source_worker: str,
    source_shm_id: str,
    source_data_offset: int,
    nbytes: int,
    shm_id: str,
    data_offset: int,
) -> dict:
    """Pull a variable from a worker of another node into a reserved extent here, in
    chunks with a few in flight: the network stays busy while arrived chunks are
    copied in, and a replica of any size needs little private memory."""
    dest = plugin.blocks[shm_id].segment.buf
    source = plugin.worker.rpc(source_worker)
    in_flight = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    async def chunk(start: int) -> None:
        n = min(TRANSFER_CHUNK, nbytes - start)
        async with in_flight:
            answer = await source.datafabric_read(
                shm_id=source_shm_id, data_offset=source_data_offset + start, nbytes=n
            )
            dest[data_offset + start : data_offset + start + n] = answer["data"]

    await asyncio.gather(*(chunk(start) for start in range(0, nbytes, TRANSFER_CHUNK)))
    return {}


def write(
    plugin: FabricWorkerPlugin, shm_id: str, extent_offset: int, extent_id: int, data_offset: int, data: Any
) -> dict:
    """Bytes streamed by a writer that cannot map this node's memory, into its reserved
    extent: checked under the allocator lock (as frees and marks are) to be RESERVED with
    the id the writer was given, and the bytes to fall inside its data.  The copy follows
    in the same step on the event loop, where every free of an extent the YellowPages
    reserved runs too, so it is still that extent's (a task thread frees only its own
    reservations, by their ids, and compaction never moves a RESERVED extent)."""
    view = memoryview(data).cast("B")
    with plugin.lock:
        if not plugin._holds(shm_id, extent_offset, extent_id, {ExtentState.RESERVED}):
            raise VariableUnavailableError(
                f"no insert in progress at offset {extent_offset} of block {shm_id} on {plugin.worker.address} "
                "under the id given: its reservation ended (sealed, aborted, or its writer left); insert it again"
            )
        buf = plugin.blocks[shm_id].segment.buf
        extent = layout.read_extent(buf, extent_offset)
    if not extent.data_offset <= data_offset <= data_offset + len(view) <= extent.data_offset + extent.data_size:
        raise InvalidArgumentError(
            f"{len(view)} bytes at offset {data_offset} fall outside the data of the extent at {extent_offset} "
            f"({extent.data_size} bytes from {extent.data_offset})"
        )
    buf[data_offset : data_offset + len(view)] = view
    return {}
