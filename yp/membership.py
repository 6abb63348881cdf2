"""Membership: which workers run the fabric on which node, and what becomes of a block
when its owner goes.

- A worker that **registers** lists the fabric's blocks it sees on its node; those this
  directory does not know were left by a crashed scheduler's fabric and are **taken back**
  (``recover``): the directory is rebuilt from their headers, and views that processes kept
  through the crash and declared already are leased in the same step (``yp/kept_views.py``).
- A worker that **dies** leaves its blocks orphaned; a live worker of the same node
  **adopts** them: it rebuilds each allocator from the extent headers, keeps the extents
  the directory names by id (reporting where each now is) and frees the rest.  A block
  whose creation its creator never confirmed is removed by the adopter.
- A worker that **closes** asks for a **handoff**: a peer adopts its blocks, or the node's
  last worker unlinks them, or keeps them for its successor when its nanny restarts it.

Block creation, adoption and take-back change who owns which block, one at a time
(``changing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from datafabric.errors import FabricError
from datafabric.messages import AdoptedBlock, KeptView, ProcessId
from datafabric.protocol import EVENT_TOPIC
from yp.declarations import Declarations
from yp.directory import Directory
from yp.kept_views import KeptViews
from yp.local_leases import LocalLeases
from yp.moves import BlockMoves
from yp.records import Block

logger = logging.getLogger("datafabric.yp")


class Membership:
    def __init__(self, scheduler: Any, fabric_id: str, directory: Directory, owners: Any, moves: BlockMoves) -> None:
        self.scheduler = scheduler
        self.moves = moves
        self.fabric_id = fabric_id
        self.directory = directory
        self.owners = owners
        self.node_of: dict[str, str] = {}  # workers that registered the fabric's plugin -> node
        self.process_of: dict[str, ProcessId] = {}  # their processes, as they registered
        # Nodes with blocks of a removed owner that may still run: the next adoption attempt.
        self._retry_delay: dict[str, float] = {}
        self._retry_scheduled: set[str] = set()
        self.changing = asyncio.Lock()
        self.took_back = False  # blocks found in shared memory were taken back
        self.local = LocalLeases.none(directory, moves)  # the YellowPages sets its own: it needs the members
        self.kept = KeptViews(directory, moves)  # views processes kept through a scheduler crash
        self.declarations = Declarations(scheduler, directory, owners, self.took_back_msg)
        # Told when a node's blocks are all known (yp/dataset_records.py rebuilds datasets then);
        # its flag says whether anything was ever taken back.  The YellowPages sets it.
        self.node_back: Callable[[str, bool], Awaitable[None]] | None = None
        # Told after an adoption, which may have kept a closing owner's own reservations as
        # a departed writer's (yp/departed.py watches them).  The YellowPages sets it.
        self.kept_reserved: Callable[[], None] = lambda: None

    # -- who is there ----------------------------------------------------------------
    def live(self) -> dict[str, list[str]]:
        """node -> its live fabric workers, sorted: Dask's view of who is alive, joined
        with which of them run the fabric."""
        nodes: dict[str, list[str]] = defaultdict(list)
        for worker, node in sorted(self.node_of.items()):
            if worker in self.scheduler.workers:
                nodes[node].append(worker)
        return dict(nodes)

    def peers(self, node: str) -> list[str]:
        return self.live().get(node, [])

    def workers_on(self, nodes: set[str]) -> list[str]:
        return sorted(w for n, ws in self.live().items() if n in nodes for w in ws)

    # -- arrivals ----------------------------------------------------------------------
    def register(self, address: str, node: str, segments: list[str] = (), process: ProcessId | None = None) -> dict:
        """``segments`` are the fabric's blocks the worker sees on its node; any this
        YellowPages does not know were left by its predecessor, and are taken back."""
        self.node_of[address] = node
        if process is not None:
            self.process_of[address] = process
        self.directory.arrived(address)  # a worker restarted at the same address
        self._schedule_waiting_for(address)
        if any(s not in self.directory.blocks for s in segments):
            self.scheduler.loop.add_callback(self.recover, address, node, list(segments))
        elif self.node_back is not None:  # every block it sees is known already
            self.scheduler.loop.add_callback(self.node_back, node, self.took_back)
        if self.directory.orphaned(node):
            self.scheduler.loop.add_callback(self.adopt_orphans, node)
        self.local.publish_node(node, only=[address])
        return {}

    def _schedule_waiting_for(self, address: str) -> None:
        """The worker set its node's resource (``datafabric.locality``) just before it
        registered, after Dask had added it: tasks of ``fabric.submit`` that wait for a
        worker of that node, in Dask's ``no-worker`` state, are scheduled now, as Dask
        does for any worker it adds."""
        ws = self.scheduler.workers.get(address)
        if ws is not None and self.scheduler.unrunnable:
            recommendations = self.scheduler.bulk_schedule_unrunnable_after_adding_worker(ws)
            self.scheduler.transitions(recommendations, stimulus_id=f"datafabric-node-resource-{time.time()}")

    async def recover(self, worker: str, node: str, segments: list[str]) -> None:
        async with self.changing:  # a block being created is not a found one
            started = time.perf_counter()
            unknown = sorted(s for s in segments if s not in self.directory.blocks)
            if self.node_of.get(worker) != node:
                return
            if not unknown:  # a peer of its node took them back first
                if self.node_back is not None:
                    self.scheduler.loop.add_callback(self.node_back, node, self.took_back)
                return
            try:
                found: list[AdoptedBlock] = await self.owners.ask(worker, "adopt", shm_ids=unknown, live=None)
            except FabricError as exc:
                logger.warning("%s could not take back blocks %s: %r", worker, unknown, exc)
                return
            found = [b for b in found if not b.get("unlinked")]  # half-created ones are gone now
            held = []
            for b in found:  # one step: views kept through the crash are leased before anything can free or move
                block = Block(b["shm_id"], node, worker, b["size"], b["capacity"], used=b["capacity"] - b["free"])
                held += self.kept.take_back(block, self.directory.recover_block(block, b["extents"]))
            self.declarations.open(held)  # still the same step: held until the kept views are declared
        self.local.publish_node(node)
        self.took_back = True
        self.scheduler.log_event(EVENT_TOPIC, self.took_back_msg())  # clients declare the views they kept
        logger.info(
            "took back %d blocks of node %s holding %d extents in %.3f s",
            len(found),
            node,
            sum(len(b["extents"]) for b in found),
            time.perf_counter() - started,
        )
        if self.node_back is not None:
            await self.node_back(node, True)

    def took_back_msg(self) -> dict:
        return {
            "op": "datafabric_took_back",
            "fabric_id": self.fabric_id,
            "first_id": self.directory.first_id,
            "round": self.declarations.last,
        }

    async def declare_kept(self, holder: str, views: list[KeptView]) -> dict[str, int]:
        """A worker process's client declares every view it kept, once: it answers every round."""
        counts = await self.kept.declare(holder, views)
        # A client that left while a block settled holds no lease now: not counted as declared,
        # or rounds would not wait for it if it reconnects under its id.
        if holder not in self.directory.departed:
            self.declarations.declared_all(holder)
        return counts

    # -- departures --------------------------------------------------------------------
    def remove(self, worker: str) -> None:
        """Its leases end and its unfinished inserts go; its blocks wait for adoption."""
        node = self.node_of.pop(worker, None)
        self.local.forget(worker)
        # Removed is not dead (missed heartbeats): its tasks may still write through its own
        # allocator, so its blocks are adopted only once its process is proven gone.
        unavailable = self.directory.orphan_blocks(worker, self.process_of.pop(worker, None))
        if unavailable:
            logger.warning(
                "until a worker of its node adopts them, %d variables are unavailable: %s",
                len(unavailable),
                unavailable[:10],
            )
        self.owners.free_later(self.directory.drop_holder(worker))
        if node is not None:
            self.scheduler.loop.add_callback(self.adopt_orphans, node)

    def lost_block(self, block: Block) -> None:
        """Its owner died while moving its extents: the block is orphaned at once (its
        offsets are unknown until the headers are read again) and adopted anew, once its
        process is proven gone (a call that failed does not prove it dead)."""
        block.left_by = self.process_of.get(block.worker) if block.worker is not None else None
        block.worker, block.unsettled = None, True
        self.scheduler.loop.add_callback(self.adopt_orphans, block.node)

    async def handoff(self, address: str, restarting: bool = False) -> dict:
        """A worker closing gracefully asks what becomes of its blocks: a peer of its node
        adopts them; the node's last worker unlinks them, and every orphan of its node with
        them (no worker is left to adopt those), unless its nanny is restarting it, when
        they wait for its successor.  A worker this YellowPages does not know (it outlived
        a scheduler restart, or was removed already) keeps them for adoption."""
        async with self.changing:  # no adoption is half-recorded while this one decides
            node = self.node_of.pop(address, None)  # from now on it is published nothing
            process = self.process_of.pop(address, None)
            if node is None:
                return {"decision": "keep"}
            await self.local.recall_worker(address)  # its tasks may still read until it leaves
            for block in self.directory.blocks.values():  # its tasks may still write their own reservations
                if block.worker == address and process is not None:
                    block.closed_by = (address, process)
            self.directory.orphan_blocks(address)
            if not self.peers(node):
                if restarting:
                    return {"decision": "keep"}
                orphans = [b.shm_id for b in self.directory.orphaned(node)]
                for shm_id in orphans:
                    self.directory.drop_block(shm_id)
                return {"decision": "unlink", "orphans": orphans}
            await self._adopt_by_a_peer(node)
            orphaned = any(not b.creating for b in self.directory.orphaned(node))
            return {"decision": "keep" if orphaned else "adopted"}

    async def adopt_orphans(self, node: str) -> None:
        """Blocks of a dead worker are taken over by a live worker of the same node (only a
        process on that node can map them); with none alive, the next one to register does
        it."""
        async with self.changing:
            await self._adopt_by_a_peer(node)

    async def _adopt_by_a_peer(self, node: str) -> None:
        """A peer that refuses (it is closing) or dies passes the turn to the next."""
        for peer in self.peers(node):
            orphans = self.directory.orphaned(node)
            if not orphans:
                return
            try:
                orphans = await self._owners_gone(peer, node, orphans)
                if orphans:
                    await self._adopt(peer, orphans)
            except FabricError as exc:
                logger.warning("%s could not adopt blocks of node %s: %r", peer, node, exc)
                continue
            return

    async def _owners_gone(self, peer: str, node: str, orphans: list[Block]) -> list[Block]:
        """The orphans that may be adopted now: those whose removed owner ``peer``, a process
        of their node, proves gone (``datafabric/processes.py``).  The others are tried again
        later (0.5 s, doubling up to 8 s), for as long as their owner's process runs."""
        left = [b for b in orphans if b.left_by is not None]
        if left:
            try:
                gone = await self.owners.ask(peer, "processes_gone", processes=[b.left_by for b in left])
            except FabricError as exc:
                logger.warning("%s could not say whether the removed owners of %s are gone: %r", peer, node, exc)
                gone = [False] * len(left)
            for block, proven in zip(left, gone, strict=True):
                if proven:
                    block.left_by = None
        if any(b.left_by is not None for b in orphans):
            self._adopt_later(node)
        else:
            self._retry_delay.pop(node, None)
        return [b for b in orphans if b.left_by is None]

    def _adopt_later(self, node: str) -> None:
        if node in self._retry_scheduled:
            return
        delay = self._retry_delay[node] = min(2 * self._retry_delay.get(node, 0.25), 8.0)
        self._retry_scheduled.add(node)

        def attempt() -> None:
            self._retry_scheduled.discard(node)
            self.scheduler.loop.add_callback(self.adopt_orphans, node)

        self.scheduler.loop.call_later(delay, attempt)

    async def _adopt(self, peer: str, orphans: list[Block]) -> None:
        """Offsets change here (an adopter may roll a move forward), so the blocks are held
        exclusively until the directory has the adopter's answer."""
        ready = sorted(b.shm_id for b in orphans if not b.creating)
        unfinished = sorted(b.shm_id for b in orphans if b.creating)
        node = orphans[0].node
        async with contextlib.AsyncExitStack() as holds:
            for shm_id in ready:
                await holds.enter_async_context(self.moves.exclusive(shm_id))
            held = {v.var_id: v for s in ready for v, _ in self.directory.copies_in(s)}
            async with self.local.withheld(held.values(), node):  # the adopter may free and move
                live = {s: self.directory.live_ids(s) for s in ready}
                closing = [s for s in ready if self.directory.blocks[s].closed_by is not None]
                answers: list[AdoptedBlock] = await self.owners.ask(
                    peer, "adopt", shm_ids=ready, live=live, unfinished=unfinished, keep_reserved=closing
                )
                for shm_id in unfinished:
                    self.directory.remove_block(shm_id)
                adopted = [b for b in answers if not b.get("unlinked")]
                adoptions = [self.directory.adopt(b["shm_id"], peer, b["free"], b["extents"]) for b in adopted]
                for shm_id in set(ready) - {b["shm_id"] for b in adopted}:  # gone, or not a valid block any more
                    logger.error("block %s of node %s could not be adopted; its copies are lost", shm_id, node)
                    self.directory.drop_block(shm_id)
        for b, adoption in zip(adopted, adoptions, strict=True):
            if adoption.lost:
                logger.error("block %s no longer holds copies of %s", b["shm_id"], adoption.lost)
            await self.owners.free(adoption.to_free)
            for state, named in adoption.to_mark.items():
                await self.owners.mark(state, named)
        self.kept_reserved()
        self.local.publish_node(node)
        logger.info("%s adopted blocks %s of node %s", peer, [b["shm_id"] for b in adopted], node)
