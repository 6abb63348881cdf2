"""Views that a process kept through a scheduler crash, declared to the restarted YellowPages.

A worker does not outlive its scheduler in Dask: it closes when the connection breaks.  But
its close waits for the tasks it is running (``Worker.close`` shuts its executor down with
``wait=True``), so a task holding fabric views can go on reading them for as long as it runs
while the restarted scheduler's YellowPages, knowing no lease, takes the blocks back and
deletes, compacts or evicts.  Such a process declares its views here (``worker_plugin/
survivors.py``), as a Dask client whose departure ends the leases, by location: block and
data offset, the one thing that does not change while it is not moved.

- A view on a block already back gets its lease at once, as a client's kept view does.
- A view on a block not back yet **waits** here, and the take-back of that block gives it its
  lease in the same step in which the block's variables appear in the directory
  (``take_back``), before anything can delete, move or free them.  A take-back frees the
  extents of variables deleted while read (their headers say DELETED) unless such a view
  declared one: that extent becomes a deleted variable leased by the declarer, freed when
  its lease ends, as any deleted-but-leased variable.
"""

from __future__ import annotations

from datafabric.layout import ExtentState
from datafabric.messages import ExtentInfo, KeptView
from yp.directory import Directory
from yp.moves import BlockMoves
from yp.records import Block, Copy, Variable


class KeptViews:
    def __init__(self, directory: Directory, moves: BlockMoves) -> None:
        self.directory = directory
        self.moves = moves
        self.waiting: dict[str, dict[int, list[str]]] = {}  # shm_id -> data offset -> a holder per view

    async def declare(self, holder: str, views: list[KeptView]) -> dict[str, int]:
        """Lease each view for ``holder`` now if its block is back, else when it comes back.
        Says how many were leased, how many wait, and how many name no variable (their
        block came back without it: the view was declared too late)."""
        self.directory.check_present(holder)
        counts = {"leased": 0, "waiting": 0, "lost": 0}
        by_block: dict[str, list[int]] = {}
        for view in views:
            by_block.setdefault(view["shm_id"], []).append(view["offset"])
        for shm_id, offsets in by_block.items():
            if shm_id not in self.directory.blocks:
                waiting = self.waiting.setdefault(shm_id, {})
                for offset in offsets:
                    waiting.setdefault(offset, []).append(holder)
                counts["waiting"] += len(offsets)
                continue
            await self.moves.settled(lambda shm_id=shm_id: [shm_id])
            at = self._variables_at(shm_id)  # no await from here to the leases: offsets stay put
            for offset in offsets:
                var = at.get(offset)
                if var is None or holder in self.directory.departed:
                    counts["lost"] += 1
                    continue
                self.directory.acquire(var, holder)
                counts["leased"] += 1
        return counts

    def take_back(self, block: Block, extents: list[ExtentInfo]) -> list[Copy]:
        """In the step that recovered ``block`` (``Directory.recover_block``): the views
        that waited for it get their leases, and its extents deleted while read become
        deleted variables if a view declared them.  Returns the deleted extents nobody
        declared, to free."""
        declared = self.waiting.pop(block.shm_id, {})
        sealed = self._variables_at(block.shm_id) if declared else {}
        to_free = []
        for e in extents:
            holders = [h for h in declared.get(e["data_offset"], []) if h not in self.directory.departed]
            if e["state"] == ExtentState.DELETED:
                copy = Copy(block.shm_id, e["extent_offset"], e["extent_size"], e["data_offset"], e["extent_id"])
                if not holders:
                    to_free.append(self.directory.uncount(copy))
                    continue
                var = self.directory.recover_deleted(e, copy)
            else:
                var = sealed.get(e["data_offset"])
            for holder in holders if var is not None else ():
                self.directory.acquire(var, holder)
        return to_free

    def forget(self, holder: str) -> None:
        """A declarer left: its views that still wait lease nothing."""
        for shm_id in list(self.waiting):
            offsets = self.waiting[shm_id]
            for offset in list(offsets):
                offsets[offset] = [h for h in offsets[offset] if h != holder]
                if not offsets[offset]:
                    del offsets[offset]
            if not offsets:
                del self.waiting[shm_id]

    def _variables_at(self, shm_id: str) -> dict[int, Variable]:
        """The block's variables by data offset: one pass over the directory, not one per view."""
        return {copy.data_offset: var for var, copy in self.directory.copies_in(shm_id)}
