"""Reads: leases, names and where variables live.

A lease is granted in one step with reading the locations, once no block of the
variable is being moved (``yp.moves``): the offsets a reader maps stay valid while the
lease lasts.  Releases arrive one-way on the batched streams, so dropping a view costs
its process no round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datafabric.messages import VariableInfo
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

    async def acquire_at(self, node: str, shm_id: str, offset: int, holder: str) -> VariableInfo:
        await self.moves.settled(lambda: [shm_id])
        var = self.directory.at_location(node, shm_id, offset)
        self.directory.acquire(var, holder)
        return self.directory.info(var)

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
