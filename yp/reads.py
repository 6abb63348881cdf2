"""Reads: leases, names and where variables live.

A lease is granted in one step with reading the locations, once no block of the
variable is being moved (``yp.moves``): the offsets a reader maps stay valid while the
lease lasts.  Releases arrive one-way on the batched streams, so dropping a view costs
its process no round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datafabric.errors import ReferenceGoneError
from datafabric.messages import ReferenceGrant, VariableInfo
from yp.directory import Directory
from yp.moves import BlockMoves
from yp.records import Variable

if TYPE_CHECKING:
    from yp.membership import Membership
    from yp.owners import Owners


@dataclass
class Reads:
    directory: Directory
    moves: BlockMoves
    owners: Owners
    members: Membership

    async def settled(self, name: str) -> Variable:
        """The variable named ``name`` once none of its blocks is being moved; use it
        before the next ``await``."""
        while True:  # the name may be deleted, or bound anew, while it waits
            var = self.directory.lookup(name)
            if not self.moves.busy(c.shm_id for c in var.copies):
                return var
            await self.moves.settled(lambda v=var: [c.shm_id for c in v.copies])

    async def acquire(self, name: str, holder: str) -> VariableInfo:
        var = await self.settled(name)
        self.directory.acquire(var, holder)
        return self.directory.info(var)

    async def acquire_many(self, names: list[str], holder: str) -> list[VariableInfo]:
        """``acquire`` of every name, all or none: the leases and offsets are taken in one
        step once no block of any of them is being moved.  A missing name refuses all."""
        while True:
            variables = [self.directory.lookup(n) for n in names]
            shm_ids = [c.shm_id for v in variables for c in v.copies]
            if not self.moves.busy(shm_ids):
                break
            await self.moves.settled(lambda vs=variables: [c.shm_id for v in vs for c in v.copies])
        for var in variables:
            self.directory.acquire(var, holder)
        return [self.directory.info(var) for var in variables]

    async def acquire_at(
        self, node: str, shm_id: str, offset: int, holder: str, extent_id: int | None = None
    ) -> VariableInfo:
        """A lease on the variable at a location.  ``extent_id``: a view kept through a
        restart, leased only if that extent is still there (``Directory.at_location``)."""
        await self.moves.settled(lambda: [shm_id])
        var = self.directory.at_location(node, shm_id, offset, extent_id)
        self.directory.acquire(var, holder)
        return self.directory.info(var)

    def lease_ref_now(self, var_id: int, holder: str) -> ReferenceGrant | None:
        """A lease on the variable with id ``var_id``, visible or deleted-but-leased, for a
        view that travelled as a reference; None if it has to wait for a move to end.

        It is granted at once while anyone holds a lease on the variable, even if one of
        its blocks is being compacted: no lease is granted during an exclusive hold except
        here, and here only while another lease exists, so a variable leased now was leased
        when the compaction took its snapshot and is not in it; its offsets stay put."""
        var = self.directory.by_id.get(var_id)
        if var is None:
            raise ReferenceGoneError(
                f"variable id {var_id} is gone: it was deleted and no view of it was left "
                "(a reference holds no lease; keep a view alive, or do not delete, while references travel)"
            )
        if not var.leases and self.moves.busy(c.shm_id for c in var.copies):
            return None
        self.directory.acquire(var, holder)
        return {"info": self.directory.info(var), "deleted": var.deleted}

    async def acquire_ref(self, var_id: int, holder: str) -> ReferenceGrant:
        while True:
            grant = self.lease_ref_now(var_id, holder)
            if grant is not None:
                return grant
            var = self.directory.by_id[var_id]
            await self.moves.settled(lambda v=var: [c.shm_id for c in v.copies])

    def release(self, var_id: int, holder: str, **_stream_extra: Any) -> None:
        self.owners.free_later(self.directory.release(var_id, holder))

    def names(self, prefix: str = "", limit: int | None = None, after: str | None = None) -> list[str]:
        return self.directory.names(prefix, limit, after)

    async def info(self, name: str) -> VariableInfo:
        var = await self.settled(name)
        return self.directory.info(var)

    def where(self, names: list[str]) -> list[str]:
        """Workers on the nodes that hold every one of ``names`` (or, failing that, the
        most of them): where a task reading them runs without moving bytes."""
        per_node: dict[str, int] = {}
        for name in names:
            for node in self.directory.nodes_of(self.directory.lookup(name)):
                per_node[node] = per_node.get(node, 0) + 1
        if not per_node:
            return []
        best = max(per_node.values())
        return self.members.workers_on({n for n, k in per_node.items() if k == best})
