"""The worker side of the fabric: the blocks this worker process owns and their allocators.

An insert in a task on this worker reserves an extent in one of its own blocks with no
RPC; every other change of a block (create, free, unlink, reservations for writers
elsewhere) arrives as a ``datafabric_<op>`` RPC from the YellowPages or a peer, on the
worker's event loop.  A lock serialises the task threads and the loop on the allocators.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from datafabric import layout
from datafabric.cleanup import remove as remove_segments
from datafabric.errors import BlockInUseError, BlockNotFoundError, InvalidArgumentError, WorkerLostError
from datafabric.layout import BlockHeader, ExtentState
from datafabric.locality import NODE_SLOTS, node_resource
from datafabric.messages import AdoptedBlock, BlockStats, CreatedBlock, Reservation
from datafabric.node import worker_node
from datafabric.processes import processes_gone, this_process
from datafabric.protocol import HANDLER_PREFIX, WORKER_PLUGIN, answering_refusals
from datafabric.reads import serve, stop_serving
from datafabric.shm import Segment, fabric_segments, is_node_block_name, node_segments
from datafabric.views import local_state
from worker_plugin import regions, transfers
from worker_plugin.adoption import HalfCreated, open_block, unlink_unmade
from worker_plugin.allocator import BlockAllocator
from worker_plugin.local_reads import USE_REPORT_EVERY, LocalReads
from worker_plugin.memory import exclude_shared_memory_in_worker
from worker_plugin.restarts import nanny_restarts
from worker_plugin.signals import leave_group_signals_to_the_nanny
from worker_plugin.survivors import declare_when_back
from worker_plugin.use_reports import UseReports

logger = logging.getLogger("datafabric.worker")

_HANDLERS = [
    "create_block",
    "reserve",
    "free",
    "compact",
    "copy_extent",
    "read",
    "fetch",
    "write",
    "fill_extent",
    "write_region",
    "unlink_block",
    "retire_block",
    "adopt",
    "mark",
    "block_stats",
    "block_extents",
    "shutdown",
]


@dataclass
class OwnedBlock:
    segment: Segment
    allocator: BlockAllocator
    # Takes no new reservation: being deallocated, or created and not yet confirmed by the
    # YellowPages (an allocate still under way may be undone; a seal there would be refused).
    closed: bool = False


class FabricWorkerPlugin(WorkerPlugin):
    name = WORKER_PLUGIN

    def __init__(self, fabric_id: str) -> None:
        self.fabric_id = fabric_id
        self.closing = False

    async def setup(self, worker: Any) -> None:
        self.worker = worker
        self.node = worker_node(worker.address)
        self.blocks: dict[str, OwnedBlock] = {}
        self.lock = threading.Lock()
        self.state = local_state(self.fabric_id)
        self.reports = UseReports(worker, USE_REPORT_EVERY, f"datafabric-uses-{self.fabric_id}")
        self.local_reads = LocalReads(self.state, self.node, worker.address, self._send, self.reports.later)
        serve(self.fabric_id, worker, self.local_reads)
        worker.handlers.update({f"{HANDLER_PREFIX}{op}": answering_refusals(getattr(self, op)) for op in _HANDLERS})
        worker.handlers[f"{HANDLER_PREFIX}processes_gone"] = answering_refusals(processes_gone)  # yp/departed.py
        worker.stream_handlers.update(
            datafabric_invalidate=self._invalidate,
            datafabric_detach=self.state.detach,
            datafabric_publish=self.local_reads.publish,
            datafabric_recall=self._recall,
        )
        exclude_shared_memory_in_worker(worker)
        leave_group_signals_to_the_nanny(bool(worker.nanny))
        atexit.register(self._unlink_all)  # a worker that exits without teardown
        # Blocks of this node already in /dev/shm: the YellowPages takes those it does not
        # know (its scheduler restarted) back into the fabric through this worker.
        found = node_segments(uuid.UUID(self.fabric_id), self.node)
        await worker.set_resources(**{node_resource(self.node): NODE_SLOTS})  # fabric.submit finds the node by it
        await worker.scheduler.datafabric_register_worker(
            address=worker.address, node=self.node, segments=found, process=this_process()
        )

    async def teardown(self, worker: Any) -> None:
        """Hand the blocks to a peer of this node, unlink them, or leave them for the
        worker's successor, as the YellowPages decides.  Without an answer (the scheduler
        died) they stay in /dev/shm for the restarted scheduler's YellowPages, to which
        this process declares the views its tasks still hold (``survivors.py``)."""
        stop_serving(self.fabric_id, self.local_reads)  # as Dask drops the plugin: gets ask the YellowPages
        self.local_reads.close()
        atexit.unregister(self._unlink_all)
        self.reports.stop()
        with self.lock:  # after a free or reservation under way: from now on it adopts nothing, and
            self.closing = True  # touches no block (a peer may own them before the answer: protocols.md)
        answer = await self._handoff(worker)
        decision = answer.get("decision", "keep")
        if decision == "unlink":
            self._unlink_all()
            remove_segments(answer.get("orphans", []))  # the node's other blocks: nobody is left to adopt them
            return
        with self.lock:
            blocks, self.blocks = self.blocks, {}
        self.state.detach(list(blocks))
        if decision != "adopted":
            logger.info("left blocks %s in shared memory for the node's next worker", sorted(blocks))
        if answer.get("scheduler_lost"):  # its running tasks may read on through the restart
            declare_when_back(worker.scheduler.address, self.fabric_id, self.state)

    @staticmethod
    async def _handoff(worker: Any) -> dict:
        stream = getattr(worker.batched_stream, "comm", None)
        if stream is None or stream.closed():
            return {"decision": "keep", "scheduler_lost": True}  # the worker closes because it lost its scheduler
        restarting = await nanny_restarts(worker)
        try:
            answer = await asyncio.wait_for(
                worker.scheduler.datafabric_handoff(address=worker.address, restarting=restarting), 10
            )
        except Exception:
            return {"decision": "keep"}
        return answer if isinstance(answer, dict) else {"decision": "keep"}

    # -- used by tasks on this worker (any thread) ---------------------------------------
    def reserve_local(self, name: str, type_: str, doc: str, nbytes: int) -> Reservation | None:
        with self.lock:  # best fit, as the YellowPages places: the large block stays whole longest
            if self.closing:
                return None
            for shm_id, block in sorted(self.blocks.items(), key=lambda item: item[1].allocator.free_bytes):
                if block.closed:
                    continue
                r = block.allocator.reserve(name, type_, doc, nbytes)
                if r is not None:
                    return r.message(shm_id)
        return None

    def mark(self, state: int, extents: list[tuple[str, int, int, str]]) -> dict:
        """Headers follow the directory, so that one rebuilt from the blocks agrees:
        SEALED once the YellowPages has sealed a name (before its writer hears back),
        DELETED when a name still being read is deleted.  An extent is marked only from
        an earlier state and while it holds that id and name: a late mark never lands on
        an extent freed and reserved again meanwhile."""
        state = ExtentState(state)
        with self.lock:
            for shm_id, extent_offset, extent_id, name in extents:
                if self._holds(shm_id, extent_offset, extent_id, _MARKED_FROM[state], name):
                    self.blocks[shm_id].allocator.set_state(extent_offset, state)
        return {}

    def owns(self, shm_id: str) -> bool:
        return shm_id in self.blocks

    def free_local(self, shm_id: str, extent_offset: int, extent_id: int) -> None:
        """Give an extent back, if it is still the one named (by offset and id)."""
        with self.lock:
            if self._holds(shm_id, extent_offset, extent_id, _FREEABLE):
                self.blocks[shm_id].allocator.free(extent_offset)

    def _holds(self, shm_id: str, offset: int, extent_id: int, states: set, name: str | None = None) -> bool:
        """Whether this worker owns that extent in that state (never once it is closing)."""
        block = self.blocks.get(shm_id)
        if self.closing or block is None or block.allocator.state_of(offset) not in states:
            return False
        extent = layout.read_extent(block.segment.buf, offset)
        return extent.extent_id == extent_id and (name is None or extent.name == name)

    # -- RPC handlers ----------------------------------------------------------------
    async def create_block(self, shm_id: str, size: int, node: str) -> CreatedBlock:
        """Create the block ``shm_id``, a name the YellowPages chose and recorded first: if
        this worker dies before answering, a peer unlinks what it left
        (``adopt(unfinished=...)``).  The header is written after the pre-fault, so a
        segment without one was never a block."""
        fabric_id = uuid.UUID(self.fabric_id)
        if node != self.node or not is_node_block_name(shm_id, fabric_id, node):
            raise InvalidArgumentError(
                f"{shm_id!r} is not a block name of fabric {fabric_id} on node {node!r} (this worker is on "
                f"node {self.node!r}); name blocks with datafabric.shm.new_block_name(fabric_id, node)"
            )
        if size < layout.BLOCK_HEADER_SIZE + layout.MIN_EXTENT or size % layout.ALIGN:
            raise InvalidArgumentError(
                f"a block of {size} bytes cannot hold an extent; ask for a multiple of {layout.ALIGN} bytes "
                f"of at least {layout.BLOCK_HEADER_SIZE + layout.MIN_EXTENT}"
            )
        segment = await asyncio.to_thread(Segment.create, shm_id, size)
        header = BlockHeader(uuid.uuid4(), fabric_id, node, size)
        layout.write_block_header(segment.buf, header)
        allocator = BlockAllocator(segment.buf, size, fresh=True)
        with self.lock:
            self.blocks[shm_id] = OwnedBlock(segment, allocator, closed=True)  # until the allocate confirms it
        self.state.map_own(segment)
        logger.info("created block %s of %d bytes on node %s", shm_id, size, node)
        return CreatedBlock(shm_id=shm_id, size=size, capacity=allocator.capacity, block_uuid=str(header.block_uuid))

    def reserve(self, shm_id: str, name: str, type: str, doc: str, nbytes: int) -> Reservation | None:
        with self.lock:
            block = self.blocks.get(shm_id)
            r = block.allocator.reserve(name, type, doc, nbytes) if block is not None and not block.closed else None
        return r.message(shm_id) if r is not None else None

    def free(self, extents: list[tuple[str, int, int]]) -> dict:
        """Give back ``(shm_id, extent offset, extent id)`` extents: a whole delete's worth
        of one owner in one message, each freed only if it is still the one named.  One
        ``free_many`` per block: each run of neighbours freed with one header write."""
        per_block: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for shm_id, extent_offset, extent_id in extents:
            per_block[shm_id].append((extent_offset, extent_id))
        with self.lock:
            for shm_id, named in per_block.items():
                block = self.blocks.get(shm_id)
                if block is None:
                    continue
                state_of, buf = block.allocator.state_of, block.segment.buf
                block.allocator.free_many(
                    {o for o, i in named if state_of(o) in _FREEABLE and layout.extent_id_at(buf, o) == i}
                )
        return {}

    async def compact(self, shm_id: str, movable: list[int]) -> dict:
        return await asyncio.to_thread(self._compact, shm_id, set(movable))

    def _compact(self, shm_id: str, movable: set[int]) -> dict:
        with self.lock:  # inserts of this worker wait; the YellowPages holds back readers
            block = self.blocks[shm_id]
            before = block.allocator.largest_free
            sizes = {offset: size for offset, size, _ in block.allocator.extents()}
            moved = block.allocator.compact(movable, block.segment.address)
            new_sizes = {offset: size for offset, size, _ in block.allocator.extents()}
            return {
                "moved": [[old, new, data, new_sizes[new]] for old, (new, data) in sorted(moved.items())],
                "bytes_moved": sum(sizes[old] for old in moved),
                "largest_free_before": before,
                "largest_free_after": block.allocator.largest_free,
            }

    async def copy_extent(self, **kwargs: Any) -> dict:
        return await transfers.copy_extent(self, **kwargs)

    def read(self, **kwargs: Any) -> dict:
        return transfers.read(self, **kwargs)

    def retire_block(self, shm_id: str, retiring: bool = True) -> dict:
        """Stop (or resume) placing new extents in a block about to be deallocated, and say
        how many inserts are still writing into it.  ``retiring=False`` also opens a block
        just created, once its allocate is confirmed."""
        with self.lock:
            block = self.blocks.get(shm_id)
            if block is None:
                raise BlockNotFoundError(f"block {shm_id} is not owned by {self.worker.address}")
            block.closed = retiring
            return {"reserved": block.allocator.count(ExtentState.RESERVED)}

    async def fetch(self, **kwargs: Any) -> dict:
        return await transfers.fetch(self, **kwargs)

    def write(self, **kwargs: Any) -> dict:
        return transfers.write(self, **kwargs)

    def fill_extent(self, **kwargs: Any) -> dict:
        return regions.fill_extent(self, **kwargs)

    def write_region(self, **kwargs: Any) -> dict:
        return regions.write_region(self, **kwargs)

    def unlink_block(self, shm_id: str) -> dict:
        with self.lock:
            block = self.blocks.get(shm_id)
            if block is not None and block.allocator.count(ExtentState.RESERVED):
                raise BlockInUseError(f"block {shm_id} has an insert in progress; try again when it is sealed")
            block = self.blocks.pop(shm_id, None)
        if block is not None:
            self.state.detach([shm_id])
            block.segment.unlink()
        return {}

    def adopt(
        self,
        shm_ids: list[str],
        live: dict[str, list[int]] | None = None,
        unfinished: list[str] = (),
        keep_reserved: list[str] = (),
    ) -> list[AdoptedBlock]:
        """Take over blocks of this node whose owner died or left, or that a restarted
        YellowPages found (``live=None``).  ``live`` lists, per block, the ids of the
        extents the directory still needs; they are kept wherever they now are, every
        other extent is freed (with ``live=None`` the sealed and deleted ones are kept), but
        for the RESERVED ones of the blocks in ``keep_reserved`` (their owner is closing).  Each answer
        describes the kept extents, so the directory re-learns their offsets.
        ``unfinished`` names blocks whose creator died before confirming them: each is
        unlinked, and so is, with ``live=None``, a found segment that has no block header.
        Unlinked ones come back with ``unlinked=True``.  A worker that is closing adopts
        nothing: it could not hand the blocks on."""
        if self.closing:
            raise WorkerLostError(f"worker {self.worker.address} is closing; ask another worker of node {self.node}")
        fabric_id = uuid.UUID(self.fabric_id)
        answers = [a for a in (unlink_unmade(s, fabric_id, self.node) for s in unfinished) if a is not None]
        for shm_id in shm_ids:
            if shm_id in unfinished:
                continue
            try:
                wanted = None if live is None else live.get(shm_id, [])
                adopted = open_block(shm_id, fabric_id, self.node, wanted, shm_id in keep_reserved)
            except FileNotFoundError:
                continue
            except HalfCreated as exc:
                if live is None and (gone := unlink_unmade(shm_id, fabric_id, self.node)) is not None:
                    answers.append(gone)
                else:
                    logger.warning("not adopting %s: %s", shm_id, exc)
                continue
            except layout.LayoutError as exc:
                logger.warning("not adopting %s: %s", shm_id, exc)
                continue
            with self.lock:
                self.blocks[shm_id] = OwnedBlock(adopted.segment, adopted.allocator)
            self.state.map_own(adopted.segment)
            answers.append(adopted.answer)
        return answers

    def block_stats(self, shm_id: str) -> BlockStats:
        """The allocator's running figures: O(1) however many extents the block holds."""
        with self.lock:
            alloc = self.blocks[shm_id].allocator
            return {
                "capacity": alloc.capacity,
                "free": alloc.free_bytes,
                "used": alloc.capacity - alloc.free_bytes,
                "largest_free": alloc.largest_free,
                "extents": len(alloc),
                "reserved": alloc.count(ExtentState.RESERVED),
                "variables": alloc.count(ExtentState.SEALED),
            }

    def block_extents(self, shm_id: str) -> list[tuple[int, int, int]]:
        """The allocator's view, to compare with a walk of the block's headers."""
        with self.lock:
            return [(o, s, int(st)) for o, s, st in self.blocks[shm_id].allocator.extents()]

    def shutdown(self) -> dict:
        self._unlink_all()
        remove_segments(fabric_segments(uuid.UUID(self.fabric_id)))
        return {}

    # -- stream handlers -------------------------------------------------------------
    def _invalidate(self, var_ids: list[int]) -> None:
        self.state.invalidate(var_ids)

    def _recall(self, token: int, var_ids: list[int]) -> None:
        self.local_reads.recall(token, var_ids, self.worker.batched_stream.send)

    def _send(self, msg: dict) -> None:
        """One-way to the scheduler from any thread, after what the event loop runs now."""
        try:
            self.worker.loop.add_callback(self.worker.batched_stream.send, msg)
        except (RuntimeError, AttributeError):
            pass  # worker closing: the scheduler drops its leases when it leaves

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """Dask calls this on the event loop for every task transition of this worker,
        before it sends what the transition decided (a finished task's result)."""
        self.reports.transitioned(start)

    def _unlink_all(self) -> None:
        with self.lock:
            blocks, self.blocks = self.blocks, {}
        self.state.detach(list(blocks))
        for block in blocks.values():
            block.segment.unlink()


_FREEABLE = {ExtentState.RESERVED, ExtentState.SEALED, ExtentState.DELETED}
_MARKED_FROM = {
    ExtentState.SEALED: {ExtentState.RESERVED},
    ExtentState.DELETED: {ExtentState.RESERVED, ExtentState.SEALED},  # sealed, or its writer has not marked it yet
}
