"""Copies: more than one extent of a variable.

A **replica** on another node (``replicate``, ``replicate_to``: a remote get caches the
bytes on its own node), or a **migrated** copy on another block of the same node (a block
being deallocated).  Both go the same way: an extent placed on the node, filled by a
worker, added to the variable, then marked SEALED by its owner.  The source is leased by
the fabric itself while it is read, so nothing moves, evicts or frees it meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from datafabric.errors import (
    BlockNotFoundError,
    NameNotFoundError,
    NotOnThisNodeError,
    OutOfSpaceError,
    VariableUnavailableError,
)
from datafabric.layout import ExtentState
from datafabric.messages import VariableInfo
from yp.directory import Directory
from yp.placement import Placement
from yp.reads import Reads
from yp.records import Block, Copy, Variable

if TYPE_CHECKING:
    from yp.local_leases import LocalLeases
    from yp.owners import Owners

SELF = "datafabric-yellowpages"  # the lease holder and writer name of the fabric's own copies


@dataclass
class Copies:
    directory: Directory
    reads: Reads
    placement: Placement
    owners: Owners
    local: LocalLeases
    _replicating: dict[tuple[int, str], asyncio.Future] = field(default_factory=dict, init=False)  # (var_id, node)

    async def replicate(self, name: str, nodes: list[str] | None = None, count: int | None = None) -> VariableInfo:
        """Copy ``name`` to other nodes ahead of time: the listed ``nodes``, or ``count``
        more nodes (most free space first), or every node with blocks."""
        var = self.directory.lookup(name)
        have = self.directory.nodes_of(var)
        blocks = self.directory.ready()
        with_blocks = sorted({b.node for b in blocks})
        if nodes is None:
            free = {n: sum(b.free for b in blocks if b.node == n) for n in with_blocks}
            targets = sorted((n for n in with_blocks if n not in have), key=lambda n: -free[n])
            targets = targets[:count] if count is not None else targets
        else:
            unknown = sorted(set(nodes) - set(with_blocks))
            if unknown:
                raise BlockNotFoundError(f"nodes {unknown} have no blocks; known nodes: {with_blocks}")
            targets = [n for n in nodes if n not in have]
        for node in targets:
            await self.replicate_to(name, node)
        return await self.reads.info(name)

    async def replicate_to(self, name: str, node: str) -> VariableInfo:
        """Make sure ``name`` has a copy on ``node``; concurrent callers share one copy."""
        var = self.directory.lookup(name)
        key = (var.var_id, node)
        while node not in self.directory.nodes_of(var):
            if key in self._replicating:
                await asyncio.shield(self._replicating[key])
                continue
            self._replicating[key] = done = asyncio.get_running_loop().create_future()
            try:
                await self._replicate(var, node)
            finally:
                del self._replicating[key]
                done.set_result(None)
        return await self.reads.info(name)

    async def _replicate(self, var: Variable, node: str) -> None:
        if not any(b.node == node for b in self.directory.owned()):
            raise NotOnThisNodeError(f"node {node!r} has no blocks to hold a replica of {var.name!r}")
        await self.reads.moves.settled(lambda: [c.shm_id for c in var.copies])
        sources = [c for c in var.copies if self.owners.owner_of(c.shm_id) is not None]
        if not sources:
            raise VariableUnavailableError.on_nodes(var.name, list(self.directory.nodes_of(var)))
        src = sources[0]
        source_worker = self.owners.owner_of(src.shm_id)
        self.directory.acquire(var, SELF)  # in the step that read src's offsets: it stays put now

        def fetch(dest: Block, data_offset: int) -> Any:
            return self.owners.ask(
                dest.worker,
                "fetch",
                source_worker=source_worker,
                source_shm_id=src.shm_id,
                source_data_offset=src.data_offset,
                nbytes=var.nbytes,
                shm_id=dest.shm_id,
                data_offset=data_offset,
            )

        try:
            copy = await self._new_copy(var, node, fetch)
        finally:
            self.owners.free_later(self.directory.release(var.var_id, SELF))
        if var.deleted:
            await self.owners.free([self.directory.uncount(copy)])
            raise NameNotFoundError(f"{var.name!r} was deleted while it was being replicated")
        self.directory.add_copy(var, copy)
        await self.owners.mark(ExtentState.SEALED, [(var.name, copy)])
        self.local.publish([var])

    async def migrate(self, block: Block) -> list[tuple[Variable, Copy]]:
        """Copy every live variable of ``block`` (held exclusively by the caller) to other
        blocks of its node, so that the block can go; returns the copies in the block,
        which the caller drops once it unlinks it (views taken before keep the old pages
        until they are dropped).  Until then each variable keeps its old copy beside the
        new one: a migration refused half-way leaves both, and nothing to free."""
        old = []
        for var, copy in self.directory.copies_in(block.shm_id):
            old.append((var, copy))
            if var.deleted:  # its pages die with the block; nothing to free later
                continue
            try:
                moved = await self._new_copy(var, block.node, self._copier(block, var, copy), {block.shm_id})
            except OutOfSpaceError:
                raise OutOfSpaceError(
                    f"no other block on node {block.node} has room for {var.name!r} "
                    f"({var.nbytes / 2**20:.1f} MiB); allocate more memory before deallocating this block"
                ) from None
            self.directory.add_copy(var, moved)
            await self.owners.mark(ExtentState.SEALED, [(var.name, moved)])
        return old

    def _copier(self, block: Block, var: Variable, copy: Copy) -> Callable:
        def copy_within_node(dest: Block, data_offset: int) -> Any:
            return self.owners.ask(
                block.worker,
                "copy_extent",
                shm_id=block.shm_id,
                data_offset=copy.data_offset,
                nbytes=var.nbytes,
                dest_node=dest.node,
                dest_shm_id=dest.shm_id,
                dest_data_offset=data_offset,
            )

        return copy_within_node

    async def _new_copy(self, var: Variable, node: str, fill: Callable, exclude: set[str] = frozenset()) -> Copy:
        """An extent on ``node`` filled by ``fill(block, data_offset)``; if filling fails,
        the extent goes back.  The caller adds it to ``var`` and has it marked."""
        dest, copy = await self.placement.reserve_filled(
            var.name,
            var.type,
            var.doc,
            var.nbytes,
            node,
            SELF,
            lambda block, c: fill(block, c.data_offset),
            only_node=True,
            exclude=frozenset(exclude),
        )
        return self.directory.seal_pending_copy(dest.shm_id, copy.extent_offset)
