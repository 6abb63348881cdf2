"""Block moves: when a block's offsets may change, and when they may be used.

The protocol, for every block:

- **exclusive** (a compaction, a migration): the only holder that changes the offsets
  of the block's copies.  It starts once no shared hold is left, and takes its snapshot
  of movable copies (visible, unleased) in the same step as it starts.
- **shared** (a free, a mark): offsets sent to the owner must stay valid until the owner
  has acted on them, so the hold lasts until the owner answers.
- **settled** (a lease, an info): a reader waits until no exclusive hold is on any
  block of the variable, then, *in the same step* (no ``await`` in between), takes its
  lease and reads the offsets.  A leased copy is never in a later snapshot, so its
  offsets stay valid for as long as the lease.

Why a starting get cannot read moved bytes: the lease and the offsets are taken in one
step while no compaction holds the block; every later compaction sees the lease and
leaves that extent where it is.  Why a free cannot hit another variable: it reads its
copy's offsets under the shared hold, after any compaction has written the new ones.
A compaction whose owner died leaves the block orphaned; its offsets are learnt again
from the headers (by extent id) when a peer adopts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from datafabric.errors import BlockNotFoundError, WorkerLostError
from datafabric.messages import BlockCompaction, CompactReport
from yp.directory import Directory
from yp.local_leases import LocalLeases
from yp.records import Block, Variable

logger = logging.getLogger("datafabric.yp")


class BlockMoves:
    def __init__(self) -> None:
        self._exclusive: set[str] = set()
        self._wanted: Counter[str] = Counter()  # exclusive holds waiting: new shared holds wait behind them
        self._shared: Counter[str] = Counter()
        self._change = asyncio.Event()

    def busy(self, shm_ids: Iterable[str]) -> bool:
        return any(s in self._exclusive for s in shm_ids)

    def held(self) -> set[str]:
        return set(self._exclusive)

    async def settled(self, shm_ids: Callable[[], Iterable[str]]) -> None:
        """Return once no block named by ``shm_ids()`` (asked afresh after each wait: a
        move can change which blocks hold a variable) is exclusively held."""
        while self.busy(shm_ids()):
            await self._next_change()

    @contextlib.asynccontextmanager
    async def exclusive(self, shm_id: str) -> AsyncIterator[None]:
        self._wanted[shm_id] += 1
        try:
            while shm_id in self._exclusive or self._shared[shm_id]:
                await self._next_change()
        except BaseException:  # cancelled while waiting: shared holds queued behind it go on
            self._wanted[shm_id] -= 1
            self._changed()
            raise
        self._wanted[shm_id] -= 1
        self._exclusive.add(shm_id)
        try:
            yield
        finally:
            self._exclusive.discard(shm_id)
            self._changed()

    @contextlib.asynccontextmanager
    async def shared(self, shm_ids: Iterable[str]) -> AsyncIterator[None]:
        ids = set(shm_ids)
        while any(s in self._exclusive or self._wanted[s] for s in ids):
            await self._next_change()
        self._shared.update(ids)
        try:
            yield
        finally:
            self._shared.subtract(ids)
            self._changed()

    async def _next_change(self) -> None:
        await self._change.wait()

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()


class Compaction:
    """Defragmentation: the owner slides a block's movable extents together; the
    directory records the new offsets before any reader of the block resumes."""

    def __init__(
        self,
        directory: Directory,
        moves: BlockMoves,
        owners: Any,
        lost: Callable[[Block], None],
        local: LocalLeases | None = None,
    ) -> None:
        self.directory = directory
        self.moves = moves
        self.owners = owners
        self._lost = lost  # an owner died mid-compaction: its block must be adopted anew
        # Recalled from the node's workers before the snapshot, published again after.
        self.local = local if local is not None else LocalLeases.none(directory, moves)

    async def compact(self, block: Block) -> BlockCompaction:
        held: list[Variable] = []
        try:
            async with self.moves.exclusive(block.shm_id):
                held = [v for v, _ in self.directory.copies_in(block.shm_id)]
                async with self.local.withheld(held, block.node):
                    return await self._compact_held(block)
        finally:
            self.local.publish(held)  # at their new offsets, now that the block is settled

    async def _compact_held(self, block: Block) -> BlockCompaction:
        """The compaction proper, under the block's exclusive hold, with its variables
        recalled from the node's workers: every local lease of them is a lease here."""
        empty: BlockCompaction = {
            "node": block.node,
            "shm_id": block.shm_id,
            "moved": [],
            "bytes_moved": 0,
            "largest_free_before": 0,
            "largest_free_after": 0,
        }
        if block.worker is None or self.directory.blocks.get(block.shm_id) is not block:
            return empty
        movable = self.directory.movable(block.shm_id)
        owner = block.worker
        try:
            r: CompactReport = await self.owners.ask(owner, "compact", shm_id=block.shm_id, movable=sorted(movable))
        except WorkerLostError:
            # Some extents may have moved, unreported: nobody reads this block's
            # offsets until a peer has adopted it and its headers said where they are
            # (unless a peer has done so already).
            logger.warning("%s died compacting block %s; it waits for adoption", owner, block.shm_id)
            if block.worker in (owner, None):
                self._lost(block)
            raise
        moved = self.directory.moved(block, movable, r["moved"])
        return {
            **empty,
            "moved": moved,
            "bytes_moved": r["bytes_moved"],
            "largest_free_before": r["largest_free_before"],
            "largest_free_after": r["largest_free_after"],
        }

    async def defragment(self, node: str | None = None) -> dict:
        """Compact every block (of ``node``) at once, moving only extents no lease holds.
        A block whose owner died is reported once the others are done (its variables
        come back when a peer adopts it)."""
        blocks = [b for b in self.directory.owned() if node is None or b.node == node]
        if node is not None and not blocks:
            raise BlockNotFoundError(f"no block on node {node!r}; `datafabric status` lists the blocks")
        results = await asyncio.gather(*(self.compact(b) for b in blocks), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        return {"moved": sorted(n for r in results for n in r["moved"]), "blocks": results}
