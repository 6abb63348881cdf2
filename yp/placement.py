"""Placement: where a new extent goes, for a writer with no room of its own, a replica or
a migrated copy.

One sequence serves them all: a block with that much free in one piece (the caller's
node first); then compacting a block whose free space is enough but in pieces; then, on
the target node, dropping unleased replicas, least recently used first (never a
variable's last copy), and compacting the block they left room in.  Only then is the
request refused.

Eviction first drops replicas until a block of the node counts the bytes asked as free.
Counted is not in one piece: leased extents, which no compaction moves, can cut that room
into pieces each too small.  So while the blocks, compacted, still refuse, one more
replica goes and they are tried again, until one fits or nothing evictable is left.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datafabric.errors import WorkerLostError
from datafabric.messages import Reservation
from yp.directory import Directory
from yp.moves import BlockMoves, Compaction
from yp.records import Block, Copy

if TYPE_CHECKING:
    from yp.local_leases import LocalLeases
    from yp.owners import Owners


@dataclass
class Placement:
    directory: Directory
    moves: BlockMoves
    compaction: Compaction
    owners: Owners
    local: LocalLeases

    async def reserve(
        self,
        name: str,
        type_: str,
        doc: str,
        nbytes: int,
        node: str | None,
        holder: str,
        *,
        only_node: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> tuple[Block, Reservation]:
        """An extent of ``nbytes`` for ``name``, recorded as ``holder``'s reservation.
        ``only_node``: on ``node`` or nowhere (a copy that must be there)."""
        request = {"name": name, "type": type_, "doc": doc, "nbytes": nbytes}
        for step in ("free", "compact", "evict"):
            if step == "evict":
                if node is None:
                    break
                await self._evict(node, nbytes, exclude)
            while True:
                placed = await self._place(step, request, node, holder, only_node, exclude)
                if placed is not None:
                    return placed
                if step != "evict" or not await self._evict(node, nbytes, exclude, one_more=True):
                    break  # the room counted free is in pieces: one more replica goes, or none is left
        raise self.directory.out_of_space(nbytes, node if only_node else None)

    async def _place(
        self, step: str, request: dict, node: str | None, holder: str, only_node: bool, exclude: frozenset[str]
    ) -> tuple[Block, Reservation] | None:
        """One pass over the blocks counting enough free (compacted first after ``free``)."""
        skip = exclude | self.moves.held()  # a block being moved now is not waited for
        for block in self.directory.placement(request["nbytes"], node, skip):
            if (only_node or step == "evict") and block.node != node:
                continue
            if step != "free":  # an eviction may leave the room it made in pieces too
                try:
                    await self.compaction.compact(block)
                except WorkerLostError:
                    continue
            r = await self._try(block, request)
            if r is not None:
                try:
                    self.directory.add_pending(holder, block.shm_id, r)
                except WorkerLostError:  # the writer left while its room was found
                    await self.owners.free([_copy(block.shm_id, r)])
                    raise
                return block, r
        return None

    async def reserve_filled(
        self,
        name: str,
        type_: str,
        doc: str,
        nbytes: int,
        node: str | None,
        holder: str,
        fill: Callable[[Block, Copy], Awaitable[Any]],
        **where: Any,
    ) -> tuple[Block, Copy]:
        """A reserved extent that ``fill(block, copy)`` has filled (a replica's bytes, a
        chunk's fill value).  A fill that fails or is cancelled gives the extent back: no
        reservation outlives a failed fill with nobody to end it."""
        block, r = await self.reserve(name, type_, doc, nbytes, node, holder, **where)
        copy = _copy(block.shm_id, r)
        try:
            await fill(block, copy)
        except BaseException:
            dropped = self.directory.drop_pending(copy.shm_id, copy.extent_offset)
            await self.owners.free([dropped] if dropped is not None else [])
            raise
        return block, copy

    async def _try(self, block: Block, request: dict) -> Reservation | None:
        if block.worker is None:
            return None
        try:
            return await self.owners.ask(block.worker, "reserve", shm_id=block.shm_id, **request)
        except WorkerLostError:
            return None  # owner unreachable: the next block

    async def _evict(self, node: str, nbytes: int, exclude: frozenset[str], one_more: bool = False) -> bool:
        """Drop unleased replicas on ``node``, least recently used first, until a block of
        it counts ``nbytes`` free, or (``one_more``) just one; whether any was dropped."""
        dropped = False
        for var, copy in self.directory.evictable(node):
            if not one_more and any(b.free >= nbytes for b in self.directory.owned() if b.node == node):
                break
            async with self.local.withheld([var], node):  # its local leases on the node are known now
                still_evictable = not var.leases and not var.deleted and len(var.copies) > 1 and copy in var.copies
                if not still_evictable or copy.shm_id in exclude or self.moves.busy([copy.shm_id]):
                    continue  # it changed while an earlier replica was being freed, or is read
                freed = self.directory.drop_copy(var, copy)
            await self.owners.free([freed])
            dropped = True
            if one_more:
                break
        return dropped


def _copy(shm_id: str, r: Reservation) -> Copy:
    return Copy(shm_id, r["extent_offset"], r["extent_size"], r["data_offset"], r["extent_id"])
