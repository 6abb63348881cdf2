"""Taking over blocks of this node that no live process owns, and removing the ones that
never became blocks.

A block's owner may die at any instant, even mid-move or mid-creation.  Adoption opens
the block as its owner would (``BlockAllocator(fresh=False)`` rolls an interrupted move
forward), keeps the extents the directory still needs, named by extent id because an
extent may have moved since the directory last heard of it, frees every other one, and
describes the kept ones so that the directory re-learns their offsets.  A segment whose
creation was never confirmed (its creator died while pre-faulting it) holds its pages
until someone unlinks it: the adopter does, if this user made it.
"""

from __future__ import annotations

import _posixshmem
import logging
import os
import uuid
from dataclasses import dataclass

from datafabric import layout
from datafabric.layout import ExtentState
from datafabric.messages import AdoptedBlock, ExtentInfo
from datafabric.shm import SHM_DIR, Segment, is_node_block_name
from worker_plugin.allocator import BlockAllocator

logger = logging.getLogger("datafabric.worker")


@dataclass
class Adopted:
    segment: Segment
    allocator: BlockAllocator
    answer: AdoptedBlock


class HalfCreated(layout.LayoutError):
    """The segment has no block header: its creator died before writing it."""


def open_block(
    shm_id: str, fabric_id: uuid.UUID, node: str, live: list[int] | None, keep_reserved: bool = False
) -> Adopted:
    """Open a block of this fabric and node as its new owner, keeping the extents whose
    ids are in ``live`` (None: every one in use).  Raises ``FileNotFoundError`` if it is
    gone, ``HalfCreated`` if it never got its header, ``LayoutError`` if it is not ours."""
    if not is_node_block_name(shm_id, fabric_id, node):
        raise layout.LayoutError(f"not a block name of fabric {fabric_id} on node {node!r}")
    try:
        segment = Segment.attach(shm_id)
    except ValueError:  # empty: created, not yet sized
        raise HalfCreated("an empty segment") from None
    try:
        if not segment.private():
            raise layout.LayoutError("not owned by this user with mode 0600")
        if bytes(segment.buf[: len(layout.BLOCK_MAGIC)]) != layout.BLOCK_MAGIC:
            raise HalfCreated("no block header (bad magic)")
        header = layout.read_block_header(segment.buf)
        if header.fabric_id != fabric_id or header.node != node:
            raise layout.LayoutError(f"block of fabric {header.fabric_id} on node {header.node}")
        allocator = BlockAllocator(segment.buf, header.size, fresh=False)
    except layout.LayoutError:
        segment.close()
        raise
    kept = _keep(segment.buf, allocator, live, keep_reserved)
    answer = AdoptedBlock(
        shm_id=shm_id,
        size=header.size,
        capacity=allocator.capacity,
        free=allocator.free_bytes,
        extents=kept,
        unlinked=False,
    )
    return Adopted(segment, allocator, answer)


# What a take-back (``live`` None) keeps: every extent in use.  A view kept through the crash
# may still read one deleted while read, or one whose seal the crash cut before its owner
# marked it; the YellowPages frees what no view declared (``yp/declarations.py``).
_FOUND = (ExtentState.SEALED, ExtentState.DELETED, ExtentState.RESERVED)


def _keep(buf: memoryview, allocator: BlockAllocator, live: list[int] | None, reserved: bool) -> list[ExtentInfo]:
    """Free what is not kept; say where what is kept is.  ``reserved``: keep every RESERVED
    extent too (its closing owner's tasks may still write into their own reservations)."""
    wanted = set(live) if live is not None else None
    kept = []
    for offset, _, state in allocator.extents():
        if state is ExtentState.FREE:
            continue
        extent = layout.read_extent(buf, offset)
        keep = (
            state in _FOUND
            if wanted is None
            else extent.extent_id in wanted or (reserved and state is ExtentState.RESERVED)
        )
        if keep:
            kept.append(extent_info(extent))
        else:
            allocator.free(offset)
    return kept


def extent_info(extent: layout.Extent) -> ExtentInfo:
    return ExtentInfo(
        extent_id=extent.extent_id,
        extent_offset=extent.offset,
        extent_size=extent.size,
        data_offset=extent.data_offset,
        state=int(extent.state),
        name=extent.name,
        type=extent.type,
        doc=extent.doc,
        nbytes=extent.data_size,
    )


def unlink_unmade(shm_id: str, fabric_id: uuid.UUID, node: str) -> AdoptedBlock | None:
    """Unlink a segment of this fabric and node that never became a block, if this user
    made it (mode 0600); the answer says so, or None if there was nothing to unlink."""
    if not is_node_block_name(shm_id, fabric_id, node):
        logger.warning("not unlinking %s: not a block name of fabric %s on node %s", shm_id, fabric_id, node)
        return None
    name = shm_id.lstrip("/")
    try:
        st = os.stat(os.path.join(SHM_DIR, name))
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            logger.warning("not unlinking %s: not owned by this user with mode 0600", name)
            return None
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return None
    logger.info("unlinked %s, a block whose creation never finished", name)
    return AdoptedBlock(shm_id=name, size=0, capacity=0, free=0, extents=[], unlinked=True)
