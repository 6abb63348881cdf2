"""The YellowPages: a SchedulerPlugin that is the fabric's single source of truth.

It never touches shared memory.  It owns the directory (names, types, docs, locations,
leases), the block inventory and placement, and it orders the workers that own blocks to
create, free and unlink.  Its RPC handlers are installed on the scheduler as
``datafabric_<op>``; lease releases arrive one-way on the scheduler's batched streams
(``datafabric_release``) so that dropping a view costs its process no round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps

from datafabric.errors import (
    BlockInUseError,
    BlockNotFoundError,
    FabricError,
    InvalidArgumentError,
    NameNotFoundError,
    NoFabricError,
    NotOnThisNodeError,
    OutOfSpaceError,
    VariableUnavailableError,
)
from datafabric.layout import ExtentState
from datafabric.names import validate_name
from datafabric.protocol import EVENT_TOPIC, HANDLER_PREFIX, SCHEDULER_PLUGIN, answering_refusals, raise_if_refused
from datafabric.shm import round_to_pages
from worker_plugin.memory import SharedMemoryAwareNanny
from worker_plugin.plugin import FabricWorkerPlugin
from worker_plugin.restarts import RestartIntent
from yp.directory import Block, Copy, Directory, ExtentRef, Variable

logger = logging.getLogger("datafabric.yp")

_SELF = "datafabric-yellowpages"  # the lease holder name of the YellowPages' own reads


def durable_fabric_id(scheduler_address: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"datafabric:{scheduler_address}").hex


_HANDLERS = [
    "register_worker",
    "handoff",
    "replicate_to",
    "allocate",
    "reserve",
    "abort",
    "seal",
    "acquire",
    "acquire_at",
    "names",
    "info",
    "delete",
    "deallocate",
    "defragment",
    "replicate",
    "where",
    "status",
    "shutdown",
]


class YellowPages(SchedulerPlugin):
    """``fabric_id`` None makes a durable fabric: its id comes from the scheduler's
    address, so the YellowPages of a scheduler restarted at that address (loaded with
    ``--preload datafabric.preload``) recognises the blocks left in shared memory."""

    name = SCHEDULER_PLUGIN

    def __init__(self, fabric_id: str | None = None) -> None:
        self.durable = fabric_id is None
        self.fabric_id: str | None = fabric_id
        self.directory = Directory()
        self._moving: dict[str, asyncio.Event] = {}  # blocks whose extents are being moved
        self._replicating: dict[tuple[int, str], asyncio.Future] = {}  # (var_id, node) in flight
        self._took_back = False  # blocks found in shared memory were taken back

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._blocks_changing = asyncio.Lock()  # block creation and recovery, one at a time
        if self.durable:
            self.fabric_id = durable_fabric_id(scheduler.address)
        scheduler.handlers.update({f"{HANDLER_PREFIX}{op}": answering_refusals(getattr(self, op)) for op in _HANDLERS})
        scheduler.stream_handlers["datafabric_release"] = self.release
        await self._install_on_workers()

    async def _install_on_workers(self) -> None:
        """The worker side goes to every worker and nanny, present and future, from here:
        a restarted scheduler's YellowPages re-installs it with no client involved."""
        plugins = [
            (self.scheduler.register_nanny_plugin, SharedMemoryAwareNanny()),
            (self.scheduler.register_nanny_plugin, RestartIntent()),
            (self.scheduler.register_worker_plugin, FabricWorkerPlugin(self.fabric_id)),
        ]
        for register, plugin in plugins:
            answers = await register(comm=None, plugin=dumps(plugin), name=plugin.name, idempotent=False)
            for address, answer in answers.items():
                if answer.get("status") == "error":
                    raise FabricError(f"{address} could not set up {plugin.name!r}: {answer.get('exception_text')}")

    async def close(self) -> None:
        """A scheduler closing on purpose takes its fabric with it, as Dask takes its
        workers; only a crash leaves the blocks for a restarted scheduler to take back."""
        if self.fabric_id is not None:
            await self.shutdown()

    # -- cluster membership ----------------------------------------------------------
    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """Its leases end and its unfinished inserts go; its blocks wait for adoption."""
        node = self.directory.workers.pop(worker, None)
        unavailable = self.directory.orphan_blocks(worker)
        if unavailable:
            logger.warning(
                "until a worker of its node adopts them, %d variables are unavailable: %s",
                len(unavailable),
                unavailable[:10],
            )
        self._free_later(self.directory.drop_holder(worker))
        if node is not None:
            self.scheduler.loop.add_callback(self._adopt_orphans, node)

    def add_client(self, scheduler: Any, client: str) -> None:
        """A client that outlived a scheduler restart reconnects to this YellowPages
        unannounced: it hears the fabric's events again, and, once blocks came back, is
        asked to declare the views it kept."""
        if not self.durable or self.fabric_id is None:
            return
        scheduler.subscribe_topic(EVENT_TOPIC, client)
        if self._took_back:
            # Not now: the client's stream does not exist yet, and its first batch must hold
            # "stream-start" alone (batches go out every 2 ms).
            scheduler.loop.call_later(0.5, self._tell_took_back, client)

    def _tell_took_back(self, client: str) -> None:
        event = (time.time(), self._took_back_msg())
        self.scheduler.report({"op": "event", "topic": EVENT_TOPIC, "event": event}, client=client)

    def _took_back_msg(self) -> dict:
        return {"op": "datafabric_took_back", "fabric_id": self.fabric_id, "first_id": self.directory.first_id}

    def remove_client(self, scheduler: Any, client: str) -> None:
        self._free_later(self.directory.drop_holder(client))

    # -- handlers ------------------------------------------------------------------
    def register_worker(self, address: str, node: str, segments: list[str] = ()) -> dict:
        """``segments`` are the fabric's blocks the worker sees on its node; any this
        YellowPages does not know were left by its predecessor, and are taken back."""
        self._running()
        self.directory.workers[address] = node
        if any(s not in self.directory.blocks for s in segments):
            self.scheduler.loop.add_callback(self._recover, address, node, list(segments))
        if self.directory.orphans.get(node):
            self.scheduler.loop.add_callback(self._adopt_orphans, node)
        return {"fabric_id": self.fabric_id}

    async def _recover(self, worker: str, node: str, segments: list[str]) -> None:
        """Rebuild the directory from blocks found in shared memory: ``worker`` adopts
        them, keeps their sealed extents, frees the rest (writes that never sealed,
        variables deleted while read), and describes the kept ones from their headers."""
        async with self._blocks_changing:  # a block being created is not a found one
            started = time.perf_counter()
            unknown = sorted(s for s in segments if s not in self.directory.blocks)
            if not unknown or self.directory.workers.get(worker) != node:
                return
            try:
                found = await self._ask(worker, "adopt", shm_ids=unknown, live=None)
            except OSError as exc:
                logger.warning("%s could not take back blocks %s: %r", worker, unknown, exc)
                return
            conflicting = []
            for b in found:
                block = Block(b["shm_id"], node, worker, b["size"], b["capacity"], used=b["capacity"] - b["free"])
                conflicting += self.directory.recover_block(block, b["sealed"])
        await self._free(conflicting)
        self._took_back = True
        self.scheduler.log_event(EVENT_TOPIC, self._took_back_msg())  # clients declare the views they kept
        logger.info(
            "took back %d blocks of node %s holding %d extents in %.3f s",
            len(found),
            node,
            sum(len(b["sealed"]) for b in found),
            time.perf_counter() - started,
        )

    async def allocate(self, mb: float) -> list[tuple[str, str]]:
        self._running()
        if not mb or mb <= 0:
            raise InvalidArgumentError(f"allocate needs a positive number of megabytes, got {mb!r}")
        nodes: dict[str, list[str]] = defaultdict(list)
        for worker, node in self.directory.workers.items():
            if worker in self.scheduler.workers:
                nodes[node].append(worker)
        if not nodes:
            raise NoFabricError("no worker runs the fabric's worker plugin yet; start workers first")
        async with self._blocks_changing:
            return await self._allocate(nodes, int(mb * 2**20) // len(nodes))

    async def _allocate(self, nodes: dict[str, list[str]], per_node: int) -> list[tuple[str, str]]:
        plan = [
            (worker, node, round_to_pages(per_node // len(workers)))
            for node, workers in sorted(nodes.items())
            for worker in sorted(workers)
        ]
        results = await asyncio.gather(
            *(self._ask(w, "create_block", size=size, node=node) for w, node, size in plan),
            return_exceptions=True,
        )
        created = [(p, r) for p, r in zip(plan, results, strict=True) if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # all or nothing: a refused allocate leaves no block behind
            await asyncio.gather(
                *(self._rpc(w).datafabric_unlink_block(shm_id=r["shm_id"]) for (w, _, _), r in created),
                return_exceptions=True,
            )
            raise failed[0]
        for (worker, node, _), r in created:
            self.directory.add_block(Block(r["shm_id"], node, worker, r["size"], r["capacity"]))
        return [(node, r["shm_id"]) for (_, node, _), r in created]

    async def reserve(self, name: str, type: str, doc: str, nbytes: int, node: str | None, holder: str) -> dict:
        """Find room for an insert whose writer has none in its own blocks."""
        self._running()
        validate_name(name)
        tried: set[str] = set()
        while candidates := self.directory.placement(nbytes, node, tried):
            block = candidates[0]
            tried.add(block.shm_id)
            try:
                r = await self._ask(
                    block.worker, "reserve", shm_id=block.shm_id, name=name, type=type, doc=doc, nbytes=nbytes
                )
            except OSError:
                continue  # owner unreachable: try the next block
            if r is not None:
                return self._pending(holder, block, r)
        for block in self.directory.placement(nbytes, node):  # enough free, but in pieces
            await self._compact(block)
            r = await self._ask(
                block.worker, "reserve", shm_id=block.shm_id, name=name, type=type, doc=doc, nbytes=nbytes
            )
            if r is not None:
                return self._pending(holder, block, r)
        if node is None:
            raise self.directory.out_of_space(nbytes)
        block, r = await self._reserve_on_node(name, type, doc, nbytes, node, holder)  # evicts replicas
        return {**r, "worker": block.worker, "node": block.node}

    def _pending(self, holder: str, block: Block, r: dict) -> dict:
        self.directory.add_pending(holder, block.shm_id, r["extent_offset"], r["extent_size"])
        return {**r, "worker": block.worker, "node": block.node}

    async def abort(self, shm_id: str, extent_offset: int) -> dict:
        ref = self.directory.drop_pending(shm_id, extent_offset)
        if ref is not None:
            await self._free([ref])
        return {}

    async def seal(self, items: list[dict], holder: str) -> list[dict]:
        """Make written variables visible, all or none (one RPC for a whole batch).  The
        answer waits until the blocks' owners have marked the extents sealed in their
        headers: an insert that returned survives a scheduler crash."""
        self._running()
        self.directory.check_new_names([item["name"] for item in items])
        described, sealed = [], []
        for item in items:
            copy = Copy(item["shm_id"], item["extent_offset"], item["extent_size"], item["data_offset"])
            var = self.directory.seal(item["name"], item["doc"], item["type"], item["nbytes"], copy)
            if self.directory.blocks[copy.shm_id].worker != holder:  # a writer in its own block marks it itself
                sealed.append((var, copy))
            described.append(self._describe(var))
        await self._mark(ExtentState.SEALED, sealed)
        return described

    async def _mark(self, state: ExtentState, copies: list[tuple[Variable, Copy]]) -> None:
        """Have the owners write ``state`` into these copies' headers: one RPC per owner.
        An owner that died is skipped; its adopter keeps what the directory lists."""
        per_owner: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
        for var, copy in copies:
            owner = self.directory.blocks[copy.shm_id].worker
            if owner is not None:
                per_owner[owner].append((copy.shm_id, copy.extent_offset, var.name))
        results = await asyncio.gather(
            *(self._ask(owner, "mark", state=int(state), extents=extents) for owner, extents in per_owner.items()),
            return_exceptions=True,
        )
        for owner, result in zip(per_owner, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("%s could not mark %d extents %s: %r", owner, len(per_owner[owner]), state.name, result)

    async def acquire(self, name: str, holder: str) -> dict:
        self._running()
        var = await self._settled(self.directory.lookup(name))
        self.directory.acquire(var, holder)
        return self._describe(var)

    async def acquire_at(self, node: str, shm_id: str, offset: int, holder: str) -> dict:
        self._running()
        if shm_id in self._moving:
            await self._moving[shm_id].wait()
        var = self.directory.at_location(node, shm_id, offset)
        self.directory.acquire(var, holder)
        return self._describe(var)

    def release(self, var_id: int, holder: str, **_stream_extra: Any) -> None:
        self._free_later(self.directory.release(var_id, holder))

    def names(self, prefix: str = "") -> list[str]:
        self._running()
        return sorted(n for n in self.directory.variables if n.startswith(prefix))

    async def info(self, name: str) -> dict:
        self._running()
        return self._describe(await self._settled(self.directory.lookup(name)))

    async def delete(self, name: str) -> dict:
        self._running()
        var = await self._settled(self.directory.lookup(name))
        if var.leases:  # it outlives this call, so its headers say deleted first, while the name is
            # still visible: no other variable of that name can sit at a copy's offset
            await self._mark(ExtentState.DELETED, [(var, c) for c in var.copies])
        var, freed = self.directory.delete(name)
        self._invalidate(var)
        await self._free(freed)
        return {"freed": bool(freed)}

    async def deallocate(self, node: str, shm_id: str, migrate: bool = False) -> dict:
        self._running()
        block = self.directory.block(node, shm_id)
        if block.worker is None:
            raise BlockInUseError(f"block {shm_id} of node {node} has no live owner; start a worker on {node} first")
        if migrate:
            await self._migrate(block)
        self.directory.check_removable(block)
        await self._rpc(block.worker).datafabric_unlink_block(shm_id=shm_id)
        self.directory.remove_block(shm_id)
        self._detach([shm_id])
        return {}

    async def replicate(self, name: str, nodes: list[str] | None = None, count: int | None = None) -> dict:
        """Copy ``name`` to other nodes ahead of time: the listed ``nodes``, or ``count``
        more nodes (most free space first), or every node with blocks."""
        self._running()
        var = await self._settled(self.directory.lookup(name))
        have = {self.directory.blocks[c.shm_id].node for c in var.copies}
        with_blocks = sorted({b.node for b in self.directory.blocks.values()})
        if nodes is None:
            free = {n: sum(b.free for b in self.directory.blocks.values() if b.node == n) for n in with_blocks}
            targets = sorted((n for n in with_blocks if n not in have), key=lambda n: -free[n])
            targets = targets[:count] if count is not None else targets
        else:
            unknown = sorted(set(nodes) - set(with_blocks))
            if unknown:
                raise BlockNotFoundError(f"nodes {unknown} have no blocks; known nodes: {with_blocks}")
            targets = [n for n in nodes if n not in have]
        for node in targets:
            await self.replicate_to(name, node)
        return self._describe(var)

    async def replicate_to(self, name: str, node: str) -> dict:
        """Make sure ``name`` has a copy on ``node``; concurrent callers share one copy."""
        self._running()
        var = await self._settled(self.directory.lookup(name))
        key = (var.var_id, node)
        while not self.directory.on_node(var, node):
            if key in self._replicating:
                await asyncio.shield(self._replicating[key])
                continue
            self._replicating[key] = done = asyncio.get_running_loop().create_future()
            try:
                await self._replicate(var, node)
            finally:
                del self._replicating[key]
                done.set_result(None)
        return self._describe(var)

    async def _replicate(self, var: Variable, node: str) -> None:
        if not any(b.node == node for b in self.directory.blocks.values()):
            raise NotOnThisNodeError(f"node {node!r} has no blocks to hold a replica of {var.name!r}")
        sources = [c for c in var.copies if self.directory.blocks[c.shm_id].worker is not None]
        if not sources:
            raise VariableUnavailableError.on_nodes(
                var.name, [self.directory.blocks[c.shm_id].node for c in var.copies]
            )
        src = sources[0]
        source_worker = self.directory.blocks[src.shm_id].worker

        def fetch(dest: Block, data_offset: int) -> Any:
            return self._ask(
                dest.worker,
                "fetch",
                source_worker=source_worker,
                source_shm_id=src.shm_id,
                source_data_offset=src.data_offset,
                nbytes=var.nbytes,
                shm_id=dest.shm_id,
                data_offset=data_offset,
            )

        self.directory.acquire(var, _SELF)  # the source may not move, be evicted nor freed meanwhile
        try:
            copy = await self._new_copy(var, node, fetch)
        finally:
            self._free_later(self.directory.release(var.var_id, _SELF))
        if var.deleted or var.var_id not in self.directory.by_id:
            await self._free([self.directory.release_copy(copy)])
            raise NameNotFoundError(f"{var.name!r} was deleted while it was being replicated")
        self.directory.add_copy(var, copy)

    async def _new_copy(self, var: Variable, node: str, fill: Any, exclude: set[str] = frozenset()) -> Copy:
        """Another copy of ``var`` on ``node``: reserve an extent, have ``fill(block,
        data_offset)`` write the bytes, then seal it.  If filling fails, the extent goes back."""
        dest, r = await self._reserve_on_node(var.name, var.type, var.doc, var.nbytes, node, _SELF, exclude)
        try:
            await fill(dest, r["data_offset"])
        except BaseException:
            await self._free([self.directory.drop_pending(dest.shm_id, r["extent_offset"])])
            raise
        copy = self.directory.seal_pending_copy(dest.shm_id, r["extent_offset"], r["data_offset"])
        await self._mark(ExtentState.SEALED, [(var, copy)])
        return copy

    async def _reserve_on_node(
        self, name: str, type_: str, doc: str, nbytes: int, node: str, holder: str, exclude: set[str] = frozenset()
    ) -> tuple[Block, dict]:
        """An extent on ``node``: free space, then compaction, then evicting replicas."""
        for attempt in ("free", "compact", "evict"):
            if attempt == "evict":
                for var, copy in self.directory.evictable(node):
                    if any(b.free >= nbytes for b in self.directory.blocks.values() if b.node == node):
                        break
                    await self._free([self.directory.drop_copy(var, copy)])
            for block in [b for b in self.directory.placement(nbytes, node, exclude) if b.node == node]:
                if attempt == "compact":
                    await self._compact(block)
                r = await self._ask(
                    block.worker, "reserve", shm_id=block.shm_id, name=name, type=type_, doc=doc, nbytes=nbytes
                )
                if r is not None:
                    self.directory.add_pending(holder, block.shm_id, r["extent_offset"], r["extent_size"])
                    return block, r
        raise self.directory.out_of_space(nbytes)

    def where(self, names: list[str]) -> list[str]:
        """Workers on the nodes that hold every one of ``names`` (or, failing that, the
        most of them): where a task reading them runs without moving bytes."""
        self._running()
        per_node: dict[str, int] = {}
        for name in names:
            var = self.directory.lookup(name)
            for node in {self.directory.blocks[c.shm_id].node for c in var.copies}:
                per_node[node] = per_node.get(node, 0) + 1
        if not per_node:
            return []
        best = max(per_node.values())
        nodes = {n for n, k in per_node.items() if k == best}
        return sorted(w for w, n in self.directory.workers.items() if n in nodes and w in self.scheduler.workers)

    async def defragment(self, node: str | None = None) -> dict:
        """Compact every block (of ``node``), moving only extents no lease holds."""
        self._running()
        blocks = [b for b in self.directory.owned() if node is None or b.node == node]
        if node is not None and not blocks:
            raise BlockNotFoundError(f"no block on node {node!r}; `datafabric status` lists the blocks")
        reports = await asyncio.gather(*(self._compact(b) for b in blocks))
        return {"moved": sorted(n for r in reports for n in r["moved"]), "blocks": reports}

    async def status(self) -> list[dict]:
        self._running()
        blocks = list(self.directory.blocks.values())
        stats = await asyncio.gather(
            *(self._block_stats(b) for b in blocks),
            return_exceptions=True,
        )
        out = []
        for b, s in zip(blocks, stats, strict=True):
            names = sorted(
                v.name for v in self.directory.variables.values() if any(c.shm_id == b.shm_id for c in v.copies)
            )
            row = {"node": b.node, "worker": b.worker, "shm_id": b.shm_id, "size": b.size, "variables": names}
            if isinstance(s, dict):
                row.update(s)
            else:  # the owner did not answer: the directory's own accounts, and why
                row.update(self._block_stats_known(b), error=repr(s))
            out.append(row)
        return sorted(out, key=lambda r: (r["node"], r["worker"] or "", r["shm_id"]))

    async def shutdown(self) -> dict:
        """Unlink every block on every worker; the fabric id is retired."""
        self._running()
        workers = {b.worker for b in self.directory.owned()} | set(self.directory.workers)
        await asyncio.gather(
            *(self._rpc(w).datafabric_shutdown() for w in workers if w in self.scheduler.workers),
            return_exceptions=True,
        )
        self._detach(list(self.directory.blocks))
        self.fabric_id = None
        self.directory = Directory()
        return {}

    # -- helpers ----------------------------------------------------------------------
    def _running(self) -> None:
        if self.fabric_id is None:
            raise NoFabricError("the fabric has been shut down; start a new one with datafabric.start(client, mb=...)")

    def _describe(self, var: Variable) -> dict:
        return {
            "var_id": var.var_id,
            "name": var.name,
            "doc": var.doc,
            "type": var.type,
            "nbytes": var.nbytes,
            "locations": self.directory.locations(var),
            "workers": self.directory.owners(var),
        }

    def _rpc(self, worker: str) -> Any:
        return self.scheduler.rpc(worker)

    async def _ask(self, worker: str, op: str, **kwargs: Any) -> Any:
        return raise_if_refused(await getattr(self._rpc(worker), f"{HANDLER_PREFIX}{op}")(**kwargs))

    def _to_worker(self, worker: str, msg: dict) -> None:
        comm = self.scheduler.stream_comms.get(worker)
        if comm is not None:
            comm.send(msg)

    def _invalidate(self, var: Variable) -> None:
        """Holders drop their cached view so a later get in their process asks again."""
        msg = {"op": "datafabric_invalidate", "var_ids": [var.var_id]}
        for holder in self.directory.holders(var):
            self._to_worker(holder, msg)
        self.scheduler.log_event(EVENT_TOPIC, {"fabric_id": self.fabric_id, **msg})

    def _detach(self, shm_ids: list[str]) -> None:
        msg = {"op": "datafabric_detach", "shm_ids": shm_ids}
        for worker in self.scheduler.workers:
            self._to_worker(worker, msg)
        self.scheduler.log_event(EVENT_TOPIC, msg)

    async def _settled(self, var: Variable) -> Variable:
        """Wait until no block holding ``var`` is being compacted; then its copies'
        offsets are current."""
        for copy in list(var.copies):
            event = self._moving.get(copy.shm_id)
            if event is not None:
                await event.wait()
        return var

    async def _compact(self, block: Block) -> dict:
        """Have the owner compact one block.  While it runs, gets, infos and deletes of its
        variables wait; the new offsets are recorded before they resume."""
        while (busy := self._moving.get(block.shm_id)) is not None:
            await busy.wait()
        done = self._moving[block.shm_id] = asyncio.Event()
        try:
            movable = {
                c.extent_offset: (var, c)
                for var in self.directory.variables.values()
                if not var.leases
                for c in var.copies
                if c.shm_id == block.shm_id
            }
            r = await self._ask(block.worker, "compact", shm_id=block.shm_id, movable=sorted(movable))
            moved = []
            for old, new_extent, new_data, new_size in r["moved"]:
                var, copy = movable[old]
                block.used += new_size - copy.extent_size
                copy.extent_offset, copy.data_offset, copy.extent_size = new_extent, new_data, new_size
                moved.append(var.name)
            return {
                "node": block.node,
                "shm_id": block.shm_id,
                "moved": moved,
                "bytes_moved": r["bytes_moved"],
                "largest_free_before": r["largest_free_before"],
                "largest_free_after": r["largest_free_after"],
            }
        finally:
            del self._moving[block.shm_id]
            done.set()

    async def _migrate(self, block: Block) -> None:
        """Copy every live variable of ``block`` to other blocks of its node, so that the
        block can go.  Views taken before keep the old pages until they are dropped."""
        while (busy := self._moving.get(block.shm_id)) is not None:
            await busy.wait()
        done = self._moving[block.shm_id] = asyncio.Event()
        try:
            for var in list(self.directory.by_id.values()):
                for copy in [c for c in var.copies if c.shm_id == block.shm_id]:
                    if var.deleted:  # its pages die with the block; nothing to free later
                        var.copies.remove(copy)
                        continue
                    await self._copy_elsewhere(block, var, copy)
        finally:
            del self._moving[block.shm_id]
            done.set()

    async def _copy_elsewhere(self, block: Block, var: Variable, copy: Copy) -> None:
        def copy_within_node(dest: Block, data_offset: int) -> Any:
            return self._ask(
                block.worker,
                "copy_extent",
                shm_id=block.shm_id,
                data_offset=copy.data_offset,
                nbytes=var.nbytes,
                dest_node=dest.node,
                dest_shm_id=dest.shm_id,
                dest_data_offset=data_offset,
            )

        try:
            moved = await self._new_copy(var, block.node, copy_within_node, exclude={block.shm_id})
        except OutOfSpaceError:
            raise OutOfSpaceError(
                f"no other block on node {block.node} has room for {var.name!r} ({var.nbytes / 2**20:.1f} MiB); "
                "allocate more memory before deallocating this block"
            ) from None
        self.directory.release_copy(copy)  # its pages go with the block
        var.copies[var.copies.index(copy)] = moved

    async def _block_stats(self, block: Block) -> dict:
        if block.worker is None:
            return self._block_stats_known(block) | {"orphaned": True}
        return await self._ask(block.worker, "block_stats", shm_id=block.shm_id)

    @staticmethod
    def _block_stats_known(block: Block) -> dict:
        """What the YellowPages knows of a block without asking its owner; the
        allocator's own figures (largest free extent, reservations) are unknown."""
        unknown = dict.fromkeys(("largest_free", "extents", "reserved"))
        return {"capacity": block.capacity, "used": block.used, "free": block.free} | unknown

    async def handoff(self, address: str, restarting: bool = False) -> dict:
        """A worker closing gracefully asks what becomes of its blocks: a peer of its node
        adopts them; the node's last worker unlinks them, unless its nanny is restarting
        it, when they wait for its successor.  A worker this YellowPages does not know (it
        outlived a scheduler restart, or was removed already) keeps them for adoption."""
        if self.fabric_id is None or self.scheduler.status.name != "running":
            return {"decision": "unlink"}
        node = self.directory.workers.pop(address, None)
        if node is None:
            return {"decision": "keep"}
        if not self._peers(node):
            return {"decision": "keep" if restarting else "unlink"}
        self.directory.orphan_blocks(address)
        await self._adopt_orphans(node)
        orphaned = any(b.worker is None for b in self.directory.blocks.values() if b.node == node)
        return {"decision": "keep" if orphaned else "adopted"}

    def _peers(self, node: str) -> list[str]:
        return sorted(w for w, n in self.directory.workers.items() if n == node and w in self.scheduler.workers)

    async def _adopt_orphans(self, node: str) -> None:
        """Blocks of a dead worker are taken over by a live worker of the same node (only
        a process on that node can map them); with none alive, the next one to register
        does it.  The adopter rebuilds each allocator from the extent headers and frees
        every extent the directory no longer needs."""
        orphans = self.directory.orphans.get(node)
        peers = self._peers(node)
        if not orphans or not peers:
            return
        shm_ids = sorted(orphans)
        live = {s: self.directory.live_extents(s) for s in shm_ids}
        try:
            adopted = await self._ask(peers[0], "adopt", shm_ids=shm_ids, live=live)
        except OSError as exc:
            logger.warning("%s could not adopt blocks %s: %r", peers[0], shm_ids, exc)
            return
        for b in adopted:
            self.directory.adopt(b["shm_id"], peers[0], b["free"])
        logger.info("%s adopted blocks %s of node %s", peers[0], [b["shm_id"] for b in adopted], node)

    async def _free(self, refs: list[ExtentRef]) -> None:
        refs = [r for r in refs if r.worker is not None]  # an orphan's adopter frees them
        results = await asyncio.gather(
            *(self._rpc(r.worker).datafabric_free(shm_id=r.shm_id, extent_offset=r.offset) for r in refs),
            return_exceptions=True,
        )
        for ref, result in zip(refs, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("could not free extent %s: %r", ref, result)

    def _free_later(self, refs: list[ExtentRef]) -> None:
        if refs:
            self.scheduler.loop.add_callback(self._free, refs)
