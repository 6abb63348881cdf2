"""The block inventory: allocate, deallocate, status, shutdown.

A block's name is chosen here and recorded (as being created) before its worker is asked
to create it, so that a creator dying half-way leaves a name a peer can remove.  Allocate
is all or nothing: a refused allocate leaves no block behind.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

from datafabric.errors import BlockInUseError, InvalidArgumentError, NoFabricError, WorkerLostError
from datafabric.messages import BlockStats, CreatedBlock
from datafabric.shm import new_block_name
from yp import sizing
from yp.copies import Copies
from yp.directory import Directory
from yp.membership import Membership
from yp.moves import BlockMoves
from yp.records import Block


class Inventory:
    def __init__(
        self,
        fabric_id: str,
        directory: Directory,
        moves: BlockMoves,
        owners: Any,
        members: Membership,
        copies: Copies,
    ) -> None:
        self.fabric_id = fabric_id
        self.directory = directory
        self.moves = moves
        self.owners = owners
        self.members = members
        self.copies = copies
        # Blocks confirmed whose allocate has not opened them yet: a deallocate is refused
        # until it has (the opening, arriving after the deallocate closed the block, would
        # open it again for inserts the unlink would then drop).
        self.opening: set[str] = set()

    async def allocate(self, mb: float) -> list[tuple[str, str]]:
        if isinstance(mb, bool) or not isinstance(mb, int | float) or not math.isfinite(mb) or mb <= 0:
            raise InvalidArgumentError(f"allocate needs a positive, finite number of megabytes, got {mb!r}")
        nodes = self.members.live()
        if not nodes:
            raise NoFabricError("no worker runs the fabric's worker plugin yet; start workers first")
        per_node = int(mb * 2**20) // len(nodes)
        held: dict[str, int] = {}
        for b in self.directory.ready():
            if b.worker is not None:
                held[b.worker] = held.get(b.worker, 0) + b.size
        async with self.members.changing:
            plan = [
                (worker, node, size, new_block_name(uuid.UUID(self.fabric_id), node))
                for node, workers in sorted(nodes.items())
                for worker, size in sizing.split(per_node, workers, held)
            ]
            for worker, node, _, shm_id in plan:
                self.directory.begin_block(shm_id, node, worker)
            results = await self._create(plan)
            created: list[CreatedBlock] = [r for r in results if not isinstance(r, BaseException)]
            failed = [(p, r) for p, r in zip(plan, results, strict=True) if isinstance(r, BaseException)]
            if failed:
                await self._undo(plan, results)
                raise failed[0][1]
            for r in created:
                self.directory.confirm_block(r["shm_id"], r["size"], r["capacity"])
            # Only now may their owners place a task's insert there (a seal in a block not
            # confirmed is refused, and an undone allocate cannot unlink a block written to).
            shm_ids = [shm_id for _, _, _, shm_id in plan]
            self.opening.update(shm_ids)  # the step that confirmed them: no deallocate saw them before
            try:
                await self.owners.ask_each(
                    [(worker, "retire_block", {"shm_id": shm_id, "retiring": False}) for worker, _, _, shm_id in plan],
                    "open the allocated blocks",
                )
            finally:
                self.opening.difference_update(shm_ids)
        return [(node, shm_id) for _, node, _, shm_id in plan]

    async def _create(self, plan: list[tuple[str, str, int, str]]) -> list[Any]:
        """The plan's blocks, the nodes at once but each node's one after the other, its
        large block first.  A node's blocks take the same machine's memory: each creator
        checks its block against what the machine can give *now*, so a block refused for
        want of memory is refused before any other block of its node has taken pages (in
        parallel, the small blocks would pre-fault gigabytes while the large one is being
        refused).  A block not tried after a refusal on its node is ``_NotTried``."""
        by_node: dict[str, list[int]] = {}
        for i, (_, node, _, _) in enumerate(plan):
            by_node.setdefault(node, []).append(i)
        results: list[Any] = [None] * len(plan)

        async def create_on(indices: list[int]) -> None:
            for k, i in enumerate(indices):
                worker, node, size, shm_id = plan[i]
                [results[i]] = await self.owners.ask_each(
                    [(worker, "create_block", {"shm_id": shm_id, "size": size, "node": node})], "allocate"
                )
                if isinstance(results[i], BaseException):
                    for j in indices[k + 1 :]:
                        results[j] = _NotTried(shm_id)
                    return

        await asyncio.gather(*(create_on(indices) for indices in by_node.values()))
        return results

    async def _undo(self, plan: list[tuple], results: list[Any]) -> None:
        """A refused allocate: unlink what was created; a creator that was lost, before it
        answered or after (it cannot unlink), leaves its name, still being created, to the
        peer that adopts its node, which unlinks what is there; every other name is
        forgotten.  The names stay recorded until the unlinks are answered: the adoption a
        death schedules waits for ``changing``, which the allocate holds."""
        unlink = []
        for (worker, _, _, shm_id), r in zip(plan, results, strict=True):
            if not isinstance(r, BaseException):
                unlink.append((worker, "unlink_block", {"shm_id": shm_id}))
            elif not isinstance(r, WorkerLostError):
                self.directory.remove_block(shm_id)
        answers = await self.owners.ask_each(unlink, "undo allocate")
        for (_, _, kwargs), answer in zip(unlink, answers, strict=True):
            if not isinstance(answer, WorkerLostError):
                self.directory.remove_block(kwargs["shm_id"])

    async def deallocate(self, node: str, shm_id: str, migrate: bool = False) -> dict:
        block = self.directory.block(node, shm_id)
        if shm_id in self.opening:
            raise BlockInUseError(
                f"block {shm_id} on node {node} is being opened by the allocate that made it; "
                "deallocate it once that allocate has returned"
            )
        if block.worker is None:
            raise BlockInUseError(f"block {shm_id} of node {node} has no live owner; start a worker on {node} first")
        held = [v for v, _ in self.directory.copies_in(shm_id)]
        try:
            await self._deallocate_held(block, migrate, held)
        finally:
            self.copies.local.publish(held)  # where they are now, the block being settled or gone
        self.detach([shm_id])
        return {}

    async def _deallocate_held(self, block: Block, migrate: bool, held: list) -> None:
        node, shm_id = block.node, block.shm_id
        async with self.moves.exclusive(shm_id):  # no reader, placement or move meanwhile
            writing = await self.owners.ask(block.worker, "retire_block", shm_id=shm_id)  # no new local insert
            try:
                inserts = writing["reserved"] + len(self.directory.pending_in(shm_id))
                if inserts:  # refused before anything moved
                    raise BlockInUseError(
                        f"block {shm_id} on node {node} has {inserts} insert{'s' * (inserts != 1)} in progress; "
                        "try again when they are sealed"
                    )
                if migrate:
                    held[:] = [v for v, _ in self.directory.copies_in(shm_id)]  # as the hold found them
                    async with self.copies.local.withheld(held, node):  # local leases are known now
                        for var, copy in await self.copies.migrate(block):
                            self.directory.drop_copy(var, copy)  # its pages go with the block
                self.directory.check_removable(block)
                await self.owners.ask(block.worker, "unlink_block", shm_id=shm_id)
            except BaseException:
                await self.owners.ask_each(
                    [(block.worker, "retire_block", {"shm_id": shm_id, "retiring": False})], "undo"
                )
                raise
            self.directory.remove_block(shm_id)

    async def status(self) -> list[dict]:
        """Per block, the owner's running figures (one RPC per block, all at once): the
        cost grows with the blocks, not with the variables they hold."""
        blocks = self.directory.ready()
        stats = await asyncio.gather(*(self._stats(b) for b in blocks), return_exceptions=True)
        out = []
        for b, s in zip(blocks, stats, strict=True):
            row = {"node": b.node, "worker": b.worker, "shm_id": b.shm_id, "size": b.size}
            if isinstance(s, dict):
                row.update(s)
            else:  # the owner did not answer: the directory's own accounts, and why
                row.update(self._known_stats(b), error=repr(s))
            out.append(row)
        return sorted(out, key=lambda r: (r["node"], r["worker"] or "", r["shm_id"]))

    async def _stats(self, block: Block) -> BlockStats | dict:
        if block.worker is None:
            return self._known_stats(block) | {"orphaned": True}
        return await self.owners.ask(block.worker, "block_stats", shm_id=block.shm_id)

    @staticmethod
    def _known_stats(block: Block) -> BlockStats:
        """What the YellowPages knows of a block without asking its owner; the
        allocator's own figures (largest free extent, reservations) are unknown."""
        unknown = dict.fromkeys(("largest_free", "extents", "reserved", "variables"))
        return {"capacity": block.capacity, "used": block.used, "free": block.free} | unknown

    async def shutdown(self) -> None:
        """Unlink every block on every worker."""
        workers = {b.worker for b in self.directory.blocks.values() if b.worker} | set(self.members.node_of)
        await self.owners.ask_each(
            ((w, "shutdown", {}) for w in workers if w in self.members.scheduler.workers), "shutdown"
        )
        self.detach(list(self.directory.blocks))

    def detach(self, shm_ids: list[str]) -> None:
        self.owners.tell_everyone({"op": "datafabric_detach", "shm_ids": shm_ids}, self.members.scheduler.workers)


class _NotTried(Exception):
    """A block of an allocate that was not created: an earlier block of its node was refused."""
