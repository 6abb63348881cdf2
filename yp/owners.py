"""The one way the YellowPages talks to block owners (and to the processes that hold leases).

Every call is checked for refusals (a worker's ``FabricError`` comes back as data and is
raised again here, with its own class), and a worker that dies while answering becomes a
``WorkerLostError``, never a raw comm error.  Frees and marks send a copy's offsets, so they
are sent under the block's shared hold (``yp.moves``), read from the copy at that moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from distributed.comm.core import CommClosedError

from datafabric.errors import WorkerLostError
from datafabric.layout import ExtentState
from datafabric.protocol import EVENT_TOPIC, HANDLER_PREFIX, raise_if_refused
from yp.chunk_columns import ChunkColumns
from yp.directory import Directory
from yp.moves import BlockMoves
from yp.records import Copy, Variable

logger = logging.getLogger("datafabric.yp")


class Owners:
    def __init__(self, scheduler: Any, directory: Directory, moves: BlockMoves) -> None:
        self.scheduler = scheduler
        self.directory = directory
        self.moves = moves

    async def ask(self, worker: str, op: str, **kwargs: Any) -> Any:
        try:
            answer = await getattr(self.scheduler.rpc(worker), f"{HANDLER_PREFIX}{op}")(**kwargs)
        except (CommClosedError, OSError) as exc:
            raise WorkerLostError(
                f"worker {worker} was lost during {op!r} ({type(exc).__name__}); "
                "a peer of its node adopts its blocks: try again"
            ) from exc
        return raise_if_refused(answer)

    async def ask_each(self, calls: Iterable[tuple[str, str, dict]], what: str) -> list[Any]:
        """Several owners at once; a failure is logged and returned in its place."""
        calls = list(calls)
        results = await asyncio.gather(*(self.ask(w, op, **kw) for w, op, kw in calls), return_exceptions=True)
        for (worker, op, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("%s: %s %s failed: %r", what, worker, op, result)
        return results

    async def free(self, copies: list[Copy]) -> None:
        """Give extents back to their owners, one RPC per owner however many.  An orphaned
        block's extents are left to its adopter, which frees whatever the directory no
        longer lists."""
        if not copies:
            return
        async with self.moves.shared({c.shm_id for c in copies}):
            per_owner: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
            owners = {shm_id: self.owner_of(shm_id) for shm_id in {c.shm_id for c in copies}}
            for c in copies:
                if (worker := owners[c.shm_id]) is not None:
                    per_owner[worker].append((c.shm_id, c.extent_offset, c.extent_id))
            await self.ask_each(((w, "free", {"extents": e}) for w, e in per_owner.items()), "free")

    def free_later(self, copies: list[Copy]) -> None:
        """From code that cannot wait (stream handlers, Dask's membership hooks)."""
        if copies:
            self.scheduler.loop.add_callback(self.free, copies)

    async def mark(self, state: ExtentState, named: list[tuple[str, Copy]]) -> None:
        """Have the owners write ``state`` into these copies' headers: one RPC per owner.
        An owner that died is skipped; its adopter marks what the directory says."""
        if named:
            async with self.moves.shared({c.shm_id for _, c in named}):
                await self._mark_held(state, named)

    async def mark_copies(self, state: ExtentState, variables: list[Variable]) -> None:
        """``mark`` of every copy of ``variables`` as it is once their blocks are held: a
        migration may replace a copy while the hold is awaited."""
        while True:
            held = {c.shm_id for v in variables for c in v.copies}
            async with self.moves.shared(held):
                if {c.shm_id for v in variables for c in v.copies} <= held:
                    await self._mark_held(state, [(v.name, c) for v in variables for c in v.copies])
                    return

    async def mark_chunks(self, state: ExtentState, columns: ChunkColumns) -> None:
        """``mark`` of a dataset's chunks just sealed, each read as it is once the blocks are
        held: one materialised and moved meanwhile is marked where its variable says."""
        async with self.moves.shared(set(columns.shm_ids)):
            await self._mark_held(state, self.directory.columns.named_copies(columns))

    async def _mark_held(self, state: ExtentState, named: list[tuple[str, Copy]]) -> None:
        per_owner: dict[str, list[tuple[str, int, int, str]]] = defaultdict(list)
        for name, c in named:
            if (worker := self.owner_of(c.shm_id)) is not None:
                per_owner[worker].append((c.shm_id, c.extent_offset, c.extent_id, name))
        await self.ask_each(
            ((w, "mark", {"state": int(state), "extents": extents}) for w, extents in per_owner.items()),
            f"mark {state.name}",
        )

    def owner_of(self, shm_id: str) -> str | None:
        block = self.directory.blocks.get(shm_id)
        return None if block is None else block.worker

    # -- one-way messages -------------------------------------------------------------
    def send(self, worker: str, msg: dict) -> None:
        comm = self.scheduler.stream_comms.get(worker)
        if comm is not None:
            comm.send(msg)

    def tell_everyone(self, msg: dict, workers: Iterable[str]) -> None:
        """Workers on their streams, clients through the fabric's event topic."""
        for worker in workers:
            self.send(worker, msg)
        self.scheduler.log_event(EVENT_TOPIC, msg)
