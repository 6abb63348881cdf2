"""Views that a process kept through a scheduler crash, declared to the restarted YellowPages.

A worker does not outlive its scheduler in Dask: it closes when the connection breaks.  But
its close waits for the tasks it is running (``Worker.close`` shuts its executor down with
``wait=True``), so a task holding fabric views can go on reading them for as long as it runs
while the restarted scheduler's YellowPages, knowing no lease, takes the blocks back and
deletes, compacts or evicts.  Such a process declares its views here (``worker_plugin/
survivors.py``), as a Dask client whose departure ends the leases, by location (block and
data offset, the one thing that does not change while it is not moved) and the id in the
extent's header (so that an extent placed at that offset since is never taken for it).

- A view on a block already back gets its lease at once if its extent is still there, as a
  client's kept view does (``Reads.acquire_at``).
- A view on a block not back yet **waits** here, and the take-back of that block gives it its
  lease in the same step in which the block's variables appear in the directory
  (``take_back``), before anything can delete, move or free them.

Every extent a take-back keeps that is no visible variable (deleted while read, reserved, or
sealed under a name another type took) becomes a deleted variable, held by the take-back's
round (``yp/declarations.py``) and by any view declared on it, and freed when the last of
them ends.
"""

from __future__ import annotations

from datafabric.messages import ExtentInfo, KeptView
from yp.directory import Directory
from yp.moves import BlockMoves
from yp.records import Block, Copy, Variable

Key = tuple[int, int]  # (data offset, extent id)


class KeptViews:
    def __init__(self, directory: Directory, moves: BlockMoves) -> None:
        self.directory = directory
        self.moves = moves
        self.waiting: dict[str, dict[Key, list[str]]] = {}  # shm_id -> extent -> a holder per view

    async def declare(self, holder: str, views: list[KeptView]) -> dict[str, int]:
        """Lease each view for ``holder`` now if its block is back, else when it comes back.
        Says how many were leased, how many wait, and how many name no extent there (it was
        freed or moved before the view was declared)."""
        self.directory.check_present(holder)
        counts = {"leased": 0, "waiting": 0, "lost": 0}
        by_block: dict[str, list[Key]] = {}
        for view in views:
            by_block.setdefault(view["shm_id"], []).append((view["offset"], view["extent_id"]))
        for shm_id, keys in by_block.items():
            if holder in self.directory.departed:  # it left while an earlier block settled
                counts["lost"] += len(keys)
                continue
            if shm_id not in self.directory.blocks:
                waiting = self.waiting.setdefault(shm_id, {})
                for key in keys:
                    waiting.setdefault(key, []).append(holder)
                counts["waiting"] += len(keys)
                continue
            await self.moves.settled(lambda shm_id=shm_id: [shm_id])
            at = self._variables_at(shm_id)  # no await from here to the leases: offsets stay put
            for key in keys:
                var = at.get(key)
                if var is None or holder in self.directory.departed:
                    counts["lost"] += 1
                    continue
                self.directory.acquire(var, holder)
                counts["leased"] += 1
        return counts

    def take_back(self, block: Block, unnamed: list[ExtentInfo]) -> list[Variable]:
        """In the step that recovered ``block`` (``Directory.recover_block``): its extents that
        are no visible variable (``unnamed``) become deleted variables, and the views that
        waited for it get their leases.  Returns every variable of the block."""
        for e in unnamed:
            copy = Copy(block.shm_id, e["extent_offset"], e["extent_size"], e["data_offset"], e["extent_id"])
            self.directory.recover_deleted(e, copy)
        at = self._variables_at(block.shm_id)
        for key, holders in self.waiting.pop(block.shm_id, {}).items():
            var = at.get(key)
            for holder in holders if var is not None else ():
                if holder not in self.directory.departed:
                    self.directory.acquire(var, holder)
        return list({v.var_id: v for v in at.values()}.values())

    def forget(self, holder: str) -> None:
        """A declarer left: its views that still wait lease nothing."""
        for shm_id in list(self.waiting):
            keys = self.waiting[shm_id]
            for key in list(keys):
                keys[key] = [h for h in keys[key] if h != holder]
                if not keys[key]:
                    del keys[key]
            if not keys:
                del self.waiting[shm_id]

    def _variables_at(self, shm_id: str) -> dict[Key, Variable]:
        """The block's variables, deleted ones still held too, by extent: one pass over the
        directory, not one per view."""
        return {(c.data_offset, c.extent_id): var for var, c in self.directory.copies_in(shm_id)}
