"""Local leases: what each node's workers may lease without asking, and taking it back.

The YellowPages **publishes** a variable to every fabric worker of each node holding a copy
of it (``worker_plugin.local_reads``), one-way on the worker's stream; a task there then
leases it in process.  ``published`` records, per variable, which workers may be doing so.

Before any copy on a node is freed or moved, the variable is **recalled** from that node's
workers: each is asked, on the same stream, to stop answering it locally and to report its
live local leases, which from then on count as that worker's leases here (released one-way,
as any other).  Only once every answer is in does the caller look at the leases.  Between the
recall and the end of the free or move, the variable is **withheld**: it is published to
nobody, so no local lease can start on the copy in question.  A worker that leaves answers
nothing: its leases, local or not, died with it.

Local reads cost the YellowPages nothing, so it would not see them: each worker reports,
one-way and batched, the variables it leased locally (each at most once a second), and
``used`` marks them used, so that replicas are still evicted least recently *read*.

``datafabric.local-reads: false`` (Dask config, read when the YellowPages starts) publishes
nothing: every get asks the YellowPages, as before local leases (a benchmark's baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import dask.config

from datafabric.messages import LocalEntry

if TYPE_CHECKING:
    from yp.chunk_columns import ChunkColumns
    from yp.directory import Directory
    from yp.membership import Membership
    from yp.moves import BlockMoves
    from yp.owners import Owners
    from yp.records import Variable

logger = logging.getLogger("datafabric.yp")
_NOBODY: frozenset[str] = frozenset()
_MAX_SETS = 4096  # distinct sets of workers kept for sharing (a cluster has a few per node)


class LocalLeases:
    def __init__(
        self, directory: Directory, moves: BlockMoves, owners: Owners | None, members: Membership | None
    ) -> None:
        self.directory = directory
        self.moves = moves
        self.owners = owners
        self.members = members
        self.enabled = members is not None and bool(dask.config.get("datafabric.local-reads", True))
        # var id -> workers that may lease it locally: a frozenset shared by every variable
        # told the same workers (a set each would be 216 bytes per variable), replaced, never changed.
        self.published: dict[int, frozenset[str]] = (
            directory.published
        )  # the directory's: a chunk materialised enters it
        self._sets: dict[frozenset[str], frozenset[str]] = {}
        self._withheld: Counter[int] = Counter()  # var id -> recalls whose free or move is not over
        # recall token -> (worker, its answer, the var ids asked): a recall overlapping one in
        # flight awaits its answer too.  Recalls in flight are few, so finding the overlapping
        # ones costs a set intersection each, not a set of answers kept per variable.
        self._asked: dict[int, tuple[str, asyncio.Future, frozenset[int]]] = {}
        self._tokens = itertools.count()

    @classmethod
    def none(cls, directory: Directory, moves: BlockMoves) -> LocalLeases:
        """Publishing nothing, so recalling nothing: for components driven without the
        YellowPages (the unit tests of compaction and membership)."""
        return cls(directory, moves, None, None)

    # -- publishing ---------------------------------------------------------------------
    def publish(self, variables: Iterable[Variable], only: Iterable[str] | None = None) -> None:
        """Tell the workers of each node holding a settled copy of a visible, unwithheld
        variable (``only`` those workers) where to find it."""
        if not self.enabled:
            return
        live = self.members.live()
        allowed = None if only is None else set(only)
        batches: dict[str, list[LocalEntry]] = defaultdict(list)
        for var in variables:
            if var.deleted or self._withheld[var.var_id] or self.directory.variables.get(var.name) is not var:
                continue
            told = self.published.get(var.var_id, _NOBODY)
            added: list[str] = []
            for copy in var.copies:
                block = self.directory.blocks.get(copy.shm_id)
                if block is None or block.creating or block.unsettled or self.moves.busy([copy.shm_id]):
                    continue
                entry: LocalEntry = {
                    "var_id": var.var_id,
                    "name": var.name,
                    "type": var.type,
                    "shm_id": copy.shm_id,
                    "data_offset": copy.data_offset,
                    "extent_id": copy.extent_id,
                }
                for worker in live.get(block.node, ()):
                    if worker not in told and worker not in added and (allowed is None or worker in allowed):
                        added.append(worker)
                        batches[worker].append(entry)
            if added:
                self._tell(var.var_id, told.union(added))
        for worker, entries in batches.items():
            self.owners.send(worker, {"op": "datafabric_publish", "entries": entries})

    def _tell(self, var_id: int, workers: frozenset[str]) -> None:
        """``workers`` are those that may lease ``var_id`` locally from now on."""
        if not workers:
            self.published.pop(var_id, None)
            return
        if len(self._sets) > _MAX_SETS:  # worker churn: the sets of workers long gone go
            self._sets.clear()
        self.published[var_id] = self._sets.setdefault(workers, workers)

    def publish_node(self, node: str, only: Iterable[str] | None = None) -> None:
        """Every variable with a copy on ``node`` (a worker joined it, a block was adopted)."""
        shm_ids = {b.shm_id for b in self.directory.blocks.values() if b.node == node}
        self.publish(
            (v for v in list(self.directory.variables.values()) if any(c.shm_id in shm_ids for c in v.copies)), only
        )
        for columns in self.directory.columns:
            self.publish_columns(columns, only, shm_ids)

    def publish_columns(
        self, columns: ChunkColumns, only: Iterable[str] | None = None, shm_ids: set[str] | None = None
    ) -> None:
        """``publish`` of a dataset's chunks still in columns (those in ``shm_ids``), a block
        at a time: each worker added to a block's ``told`` is sent every chunk of it there."""
        if not self.enabled:
            return
        live = self.members.live()
        allowed = None if only is None else set(only)
        batches: dict[str, list[LocalEntry]] = defaultdict(list)
        for k, shm_id in enumerate(columns.shm_ids):
            block = self.directory.blocks.get(shm_id)
            if (shm_ids is not None and shm_id not in shm_ids) or block is None or block.creating:
                continue
            if block.unsettled or self.moves.busy([shm_id]):
                continue
            told = columns.told.get(k, _NOBODY)
            added = [w for w in live.get(block.node, ()) if w not in told and (allowed is None or w in allowed)]
            positions = columns.in_block(shm_id).tolist()
            if added and positions:
                entries = [columns.local_entry(i) for i in positions]
                for worker in added:
                    batches[worker].extend(entries)
                columns.told[k] = told.union(added)
        for worker, entries in batches.items():
            self.owners.send(worker, {"op": "datafabric_publish", "entries": entries})

    # -- recalling ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def withheld(self, variables: Iterable[Variable], node: str | None = None) -> AsyncIterator[None]:
        """Recall ``variables`` (from ``node``'s workers, or every node's) and keep them
        unpublished for the block: on entry no local lease of them on that node is
        unknown here, and none starts until the block ends; then they are published
        again where they still are."""
        variables = list(variables)
        self._withheld.update(v.var_id for v in variables)
        try:
            await self._recall([v.var_id for v in variables], node)
            yield
        finally:
            withheld = self._withheld
            for var in variables:
                if (left := withheld[var.var_id] - 1) > 0:
                    withheld[var.var_id] = left
                else:
                    del withheld[var.var_id]
            self.publish(variables)

    async def _recall(
        self, var_ids: list[int], node: str | None, workers: set[str] | None = None, columnar: list[int] = ()
    ) -> None:
        """``columnar``: ids of chunks in columns already untold to the one worker of
        ``workers``, to ask it too."""
        loop = asyncio.get_running_loop()
        asking = frozenset(var_ids)
        # An earlier recall's answers count too: leases it reports are not known here yet.
        awaited = {answer for _, answer, ids in self._asked.values() if not ids.isdisjoint(asking)}
        per_worker: dict[str, list[int]] = defaultdict(list)
        published = self.published
        for var_id in var_ids:
            told = published.get(var_id)
            if told is None:
                continue
            recalled = []
            for worker in told:
                # A worker whose node is no longer known is recalled too: a recall too many costs
                # a message, one too few a view whose bytes could change.
                on_node = node is None or self.members.node_of.get(worker, node) == node
                if on_node and (workers is None or worker in workers):
                    per_worker[worker].append(var_id)
                    recalled.append(worker)
            if len(recalled) == len(told):
                del published[var_id]
            elif recalled:
                self._tell(var_id, told.difference(recalled))
        if columnar:
            per_worker[next(iter(workers))].extend(columnar)
        for worker, ids in per_worker.items():
            token = next(self._tokens)
            answer = loop.create_future()
            self._asked[token] = (worker, answer, frozenset(ids))
            awaited.add(answer)
            if worker in self.owners.scheduler.stream_comms:
                self.owners.send(worker, {"op": "datafabric_recall", "token": token, "var_ids": ids})
            else:  # it has left: its leases went with it
                self._answered(token, [])
        if awaited:
            await asyncio.shield(asyncio.gather(*awaited))

    def recalled(self, token: int, leases: list[tuple[int, int]], worker: str | None = None, **_: Any) -> None:
        """A worker's answer (on its stream): its live local leases become leases here."""
        asked = self._asked.get(token)
        if asked is None or asked[0] != worker:
            return
        for var_id, count in leases:
            var = self.directory.by_id.get(var_id)
            if var is None:
                logger.error("%s reported %d local leases of variable %d, which is gone", worker, count, var_id)
                continue
            self.directory.add_leases(var, worker, count)
        self._answered(token, leases)

    def used(self, var_ids: list[int], **_: Any) -> None:
        """A worker's report (on its stream) of variables it leased locally."""
        self.directory.used(var_ids)

    def _answered(self, token: int, leases: list) -> None:
        _, answer, _ = self._asked.pop(token)
        if not answer.done():
            answer.set_result(leases)

    async def recall_worker(self, worker: str) -> None:
        """``worker`` is closing: whatever it leased locally becomes its leases here,
        which end when it leaves, and it is published nothing more."""
        columnar = self._untell_columns(worker)  # first: a chunk materialised meanwhile is not its
        await self._recall([v for v, ws in self.published.items() if worker in ws], None, {worker}, columnar)

    def _untell_columns(self, worker: str) -> list[int]:
        """Take ``worker`` out of every block's ``told`` of the chunks still in columns;
        the ids of those chunks."""
        untold: list[int] = []
        for columns in self.directory.columns:
            for k, told in list(columns.told.items()):
                if worker in told:
                    columns.told[k] = told.difference((worker,))
                    untold += (columns.first_id + columns.in_block(columns.shm_ids[k])).tolist()
        return untold

    def forget(self, worker: str) -> None:
        """``worker`` left: it leases nothing locally any more, and answers no recall."""
        for var_id in [v for v, ws in self.published.items() if worker in ws]:
            self._tell(var_id, self.published[var_id].difference((worker,)))
        self._untell_columns(worker)
        for token in [t for t, (w, _, _) in self._asked.items() if w == worker]:
            self._answered(token, [])
