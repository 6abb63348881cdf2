"""Where the bytes of a ``GET data/`` come from, in pieces, under the response's lease.

If the scheduler's process can map a copy (the block is on its machine, and its header
names this fabric and the copy's node: the same rule as a get's, ``datafabric/views.py``),
the block is mapped **read-only** and each piece is a view of the mapping, written to the
socket with no copy.  Otherwise each piece is read from the copy's owner with its ``read``
handler, one piece ahead of the socket.  Either way no more than two pieces are in the
scheduler's memory at once, whatever the variable's size.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from distributed.protocol.serialize import Serialized, deserialize

from datafabric import layout
from datafabric.errors import VariableUnavailableError
from datafabric.messages import VariableInfo
from datafabric.node import configured_node
from datafabric.shm import SHM_DIR, is_block_name
from yp.http.slices import Piece

if TYPE_CHECKING:
    from yp.plugin import YellowPages


def map_read_only(shm_id: str, node: str, fabric_id: str) -> mmap.mmap | None:
    """A read-only mapping of a block of this fabric on ``node``, or None if this process
    cannot map it (another machine, another simulated node, a block unlinked since).  A
    scheduler given a node id (``datafabric.node-id``) maps only blocks of that node."""
    here = configured_node()
    if not is_block_name(shm_id) or (here is not None and here != node):
        return None
    try:
        fd = os.open(os.path.join(SHM_DIR, shm_id), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < layout.BLOCK_HEADER_SIZE:
            return None
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        header = layout.read_block_header(memoryview(mapping))
    except layout.LayoutError:
        header = None
    if header is None or header.fabric_id != uuid.UUID(fabric_id) or header.node != node:
        mapping.close()
        return None
    return mapping


async def read_pieces(
    yp: YellowPages, info: VariableInfo, pieces: list[Piece]
) -> AsyncIterator[tuple[Piece, memoryview | bytes]]:
    """Each piece with its raw bytes, in order.  The caller holds a lease on the variable
    for as long as it iterates, so the offsets in ``info`` stay valid."""
    for (node, shm_id, data_offset), _ in zip(info["locations"], info["workers"], strict=True):
        mapping = map_read_only(shm_id, node, yp.fabric_id)
        if mapping is None:
            continue
        try:
            mem = memoryview(mapping)
            for p in pieces:
                yield p, mem[data_offset + p.start : data_offset + p.start + p.nbytes]
        finally:
            mem = None
            _close(mapping)
        return
    remote = [(w, shm_id, off) for (_, shm_id, off), w in zip(info["locations"], info["workers"], strict=True) if w]
    if not remote:
        raise VariableUnavailableError.on_nodes(info["name"], [n for n, _, _ in info["locations"]])
    worker, shm_id, data_offset = remote[0]

    async def fetch(p: Piece) -> bytes:
        answer = await yp.owners.ask(worker, "read", shm_id=shm_id, data_offset=data_offset + p.start, nbytes=p.nbytes)
        data = answer["data"]
        if isinstance(data, Serialized):  # the scheduler's comms leave payloads serialized
            data = deserialize(data.header, data.frames)
        return data

    ahead: asyncio.Task | None = None
    try:
        for k, p in enumerate(pieces):
            data = await (ahead if ahead is not None else fetch(p))
            ahead = asyncio.ensure_future(fetch(pieces[k + 1])) if k + 1 < len(pieces) else None
            yield p, data
    finally:
        if ahead is not None:
            ahead.cancel()


def _close(mapping: mmap.mmap) -> None:
    """Unmap now, or, while a piece written to a socket still holds a view of the
    mapping, when that view is collected."""
    try:
        mapping.close()
    except BufferError:
        pass
