"""Inserts: room for a writer that has none in its own blocks, giving it back, and the seal.

Who marks a header SEALED: the block's owner, always before the writer's insert returns.
A writer that owns the block (a task on that worker) marks it in its own process after
the seal is answered; for every other writer the YellowPages has the owner mark it before
it answers.  So an insert that returned survives a scheduler crash, whichever path placed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from datafabric.errors import WorkerLostError
from datafabric.layout import ExtentState
from datafabric.messages import Placement as PlacementMsg
from datafabric.messages import ProcessId, SealItem, VariableInfo
from datafabric.names import validate_new_name
from yp.directory import Directory
from yp.placement import Placement

if TYPE_CHECKING:
    from yp.local_leases import LocalLeases
    from yp.membership import Membership
    from yp.owners import Owners


@dataclass
class Inserts:
    directory: Directory
    placement: Placement
    owners: Owners
    members: Membership
    local: LocalLeases

    async def reserve(
        self,
        name: str,
        type: str,
        doc: str,
        nbytes: int,
        node: str | None,
        holder: str,
        process: ProcessId | None = None,
    ) -> PlacementMsg:
        """``process``: the writer's, which maps the block when ``node`` is the block's or
        None (``writer.PendingWrite``); its reservation then outlives its departure while
        the process lives (``yp/departed.py``).  Recorded in the step that records the
        reservation: nothing runs between ``placement.reserve``'s last step and this one."""
        validate_new_name(name)
        block, r = await self.placement.reserve(name, type, doc, nbytes, node, holder)
        if process is not None and node in (None, block.node):
            self.directory.pending[(block.shm_id, r["extent_offset"])].writer = process
        return {**r, "worker": block.worker, "node": block.node}

    async def abort(self, shm_id: str, extent_offset: int, extent_id: int) -> dict:
        copy = self.directory.drop_pending(shm_id, extent_offset, extent_id)
        if copy is not None:
            await self.owners.free([copy])
        return {}

    async def seal(self, items: list[SealItem], holder: str) -> list[VariableInfo]:
        """Make written variables visible, all or none (one RPC for a whole batch)."""
        for item in items:  # a task's own reservations reach the YellowPages first here
            validate_new_name(item["name"])
        pending, local = self.directory.pending, []
        for item in items:  # the YellowPages' reservations are named by id and holder too
            entry = pending.get((item["shm_id"], item["extent_offset"]))
            if entry is None:
                local.append(item["name"])
            elif entry.copy.extent_id != item["extent_id"] or entry.holder != holder:
                raise WorkerLostError(
                    f"the reservation {holder} wrote {item['name']!r} into ended before its seal (its writer "
                    "left the scheduler) and the memory is reserved for another writer now; insert it again"
                )
        self.directory.check_present(holder)
        if local and holder not in self.members.node_of:
            # Reserved in the writer's own block, which a peer has adopted (or is adopting)
            # since the writer left: the reservation went with it.
            raise WorkerLostError(f"the writer {holder} of {local[:3]} left the fabric before they were sealed")
        sealed = self.directory.seal_all(items)
        await self.owners.mark(
            ExtentState.SEALED,
            [(var.name, var.copies[0]) for var in sealed if self.owners.owner_of(var.copies[0].shm_id) != holder],
        )
        self.local.publish(sealed)
        return [self.directory.info(var) for var in sealed]
