"""Datasets: create, chunk homes for writers, write tickets, seal, end.

The write protocol (``docs/protocols.md``, "Datasets"):

- ``begin_write`` takes a **write ticket** for the calling process, in the same step that
  checks the dataset is writing, then finds each chunk's **home**.  A chunk's first writer
  makes it: a RESERVED extent reserved on the writer's node (placement as for inserts),
  which its owner fills with the fill value before the home is recorded.  One placement
  per chunk is in flight at a time (``yp/chunk_homes.py``); a second writer of the chunk
  waits for it and is given the same home, so a chunk never has two.
- A ticket that writes some chunks **whole** (``whole``, with a ``ticket`` id) gets homes
  it makes for them unfilled, which nobody else is handed until the ticket ends: with
  those chunks confirmed ``complete`` (ordinary homes from then on), or not (freed: the
  chunk reads as the fill value).
- A **write-once** ticket (``once``, what a zarr store's chunk writes take) also claims
  its chunks, in the same step: a chunk claimed or with a home already is refused
  (``ChunkWrittenError``), so of two such writers of one chunk exactly one writes it.
- The writer then writes its bytes: through its own mapping on the home's node, or to the
  home's owner (``write_region``, worker to worker) from elsewhere; then ``end_write``.
- ``seal`` refuses new tickets, waits until none is in flight, turns every home into a
  chunk variable and has the owners mark each header SEALED, then writes the dataset's
  record on its record node and has it marked SEALED (``yp/dataset_records.py``: what a
  restarted YellowPages rebuilds it from), and only then makes the dataset visible (one
  step): readers never see a chunk change.
- ``end`` (delete or abort of an unsealed dataset, or its creator leaving) hides the name
  at once, refuses new tickets, waits until none is in flight, then frees the homes.  A
  ticket of a process that left ends with it: a dead writer writes nothing more.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from datafabric.datasets.grid import chunk_shape, chunk_type, grid_shape, unravel
from datafabric.errors import ChunkWrittenError, FabricError, InvalidArgumentError, InvalidNameError
from datafabric.layout import ExtentState
from datafabric.messages import ChunkHome, DatasetInfo, VariableInfo
from datafabric.names import CHUNK_PREFIX, chunk_name, is_chunk_name, validate_new_name
from datafabric.types import from_datashape
from yp.chunk_homes import ChunkHomes
from yp.dataset_records import DatasetRecords
from yp.dataset_table import ENDING, SEALED, SEALING, DatasetRecord, DatasetTable
from yp.directory import Directory
from yp.placement import Placement
from yp.records import Copy

if TYPE_CHECKING:
    from yp.deletes import Deletes
    from yp.local_leases import LocalLeases
    from yp.membership import Membership
    from yp.owners import Owners
    from yp.reads import Reads

logger = logging.getLogger("datafabric.yp")


@dataclass
class Datasets:
    directory: Directory
    placement: Placement
    owners: Owners
    reads: Reads
    deletes: Deletes
    members: Membership
    local: LocalLeases
    table: DatasetTable = field(init=False)
    records: DatasetRecords = field(init=False)
    homes: ChunkHomes = field(init=False)
    _idle: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ended: dict[int, asyncio.Event] = field(default_factory=dict)
    # Tickets in flight by (dataset id, holder, ticket id): an end counts only for a ticket
    # still open, never for one begun after a departure ended it (a client reconnects).
    _open: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.table = DatasetTable(self.directory.datasets, self.directory.variables)
        self.records = DatasetRecords(self.directory, self.placement, self.owners, self.reads, self.deletes, self.table)
        self.homes = ChunkHomes(self.directory, self.placement, self.owners, self._notify)

    # -- create and open -----------------------------------------------------------------
    def create(
        self,
        name: str,
        shape: list[int],
        element: str,
        chunks: list[int],
        fillvalue: bytes,
        doc: str,
        attrs: dict,
        holder: str,
    ) -> DatasetInfo:
        validate_new_name(name)
        self.directory.check_present(holder)
        itemsize = from_datashape(element).dtype.itemsize
        if len(fillvalue) != itemsize or len(shape) != len(chunks) or any(c < 1 for c in chunks):
            raise InvalidArgumentError(f"dataset {name!r}: shape {shape}, chunks {chunks} or fill value do not agree")
        record = DatasetRecord(
            next(self.directory._ids), name, tuple(shape), element, tuple(chunks), fillvalue, doc, attrs, holder
        )
        self.table.add(record)
        return record.message()

    def open(self, name: str) -> DatasetInfo:
        return self.table.lookup(name).message()

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.table.names(prefix))

    # -- the directory's listing, with datasets as one entry each ----------------------------
    def names(self, prefix: str = "", limit: int | None = None, after: str | None = None) -> list[str]:
        """A page of the listing: variables (chunks hidden) and sealed datasets, merged in order."""
        variables = self.directory.names(prefix, limit, after, hidden=CHUNK_PREFIX)
        merged = heapq.merge(variables, self.table.names(prefix, limit, after))
        return list(itertools.islice(merged, limit))

    def count(self, prefix: str = "") -> int:
        """How many entries ``names`` lists under ``prefix``, without listing them."""
        return self.directory.count(prefix, hidden=CHUNK_PREFIX) + self.table.count(prefix)

    async def delete_many(self, names: list[str] | None = None, prefix: str | None = None) -> dict:
        """``Deletes.delete_many`` for variables, and every dataset named or under ``prefix``
        deleted as ``delete`` does.  All named must exist, or nothing is deleted."""
        if names is not None:
            known = self.directory.datasets
            datasets = [n for n in dict.fromkeys(names) if n in known] if known else []
            variables = [n for n in names if n not in known] if datasets else names
        else:
            datasets = [n for n in list(self.directory.datasets) if n.startswith(prefix or "")]
            variables = None
        deleted = 0
        if variables is None or variables:
            deleted = (await self.deletes.delete_many(variables, prefix if names is None else None))["deleted"]
        for name in datasets:
            if name in self.directory.datasets:
                await self.delete(name)
                deleted += 1
        return {"deleted": deleted}

    async def info(self, name: str) -> VariableInfo | dict:
        record = self.table.sealed(name)
        if record is None:
            return await self.reads.info(name)
        itemsize = from_datashape(record.element).dtype.itemsize
        nbytes = int(np.prod(record.shape, dtype=np.int64)) * itemsize
        return {
            "name": name,
            "doc": record.doc,
            "type": chunk_type(record.element, record.shape),
            "nbytes": nbytes,
            "locations": [],
            "dataset": {"shape": list(record.shape), "chunks": list(record.chunks), "written": _written(record)},
        }

    # -- writing -------------------------------------------------------------------------
    async def begin_write(
        self,
        name: str,
        dataset_id: int,
        flats: list[int],
        node: str | None,
        holder: str,
        once: bool = False,
        whole: list[int] | None = None,
        ticket: str = "",
    ) -> list[ChunkHome]:
        """``whole``: the chunks this ticket writes every element of; homes made for them
        are unfilled until ``end_write`` with the same ``ticket`` says which are complete."""
        record = self.table.writable(name, dataset_id)
        self.directory.check_present(holder)
        count = record.nchunks
        if any(not 0 <= f < count for f in flats):
            raise InvalidArgumentError(f"chunk indices {flats[:5]} are outside dataset {name!r}'s {count} chunks")
        if once:
            self._claim(record, flats)
        record.writes[holder] += 1  # in the step that checked the state: a seal started later waits for it
        self._open[dataset_id, holder, ticket] += 1
        # One placement at a time (thousands at once would swamp the owners' connections),
        # each ended before the ticket is, failed or not: a seal never misses a home.
        wholly = set(whole or ()) if ticket else set()
        record.record_node = record.record_node or self._record_node(node)  # named in every chunk's doc
        try:
            homes = []
            for f in sorted(flats):  # in ascending order: waits for unfilled homes never form a cycle
                writer = (holder, ticket) if f in wholly else None
                copy, unfilled = await self.homes.home(record, f, node, _chunk_type(record, f), writer)
                homes.append(self._home_message(record, f, copy, unfilled))
            return homes
        except BaseException:
            if once:  # a chunk whose home was made stays refused; the others may be written again
                record.claimed.difference_update(f for f in flats if f not in record.homes)
            await self.end_write(dataset_id, holder, ticket)  # its unfilled homes are freed
            raise

    def _claim(self, record: DatasetRecord, flats: list[int]) -> None:
        """Check and claim in one step (no await between): a write-once chunk has one writer."""
        taken = [f for f in flats if not self.homes.claimable(record, f)]
        if taken:
            raise ChunkWrittenError(
                f"chunk(s) {taken[:5]} (C-order numbers) of dataset {record.name!r} were written already; "
                "a write-once write takes each chunk once"
            )
        record.claimed.update(flats)
        self.homes.reclaimable.difference_update((record.dataset_id, f) for f in flats)

    def end_write_sent(
        self, dataset_id: int, holder: str, ticket: str = "", complete: list[int] | None = None, **_stream_extra: Any
    ) -> None:
        """``end_write`` sent one-way on the writer's stream (no round trip).  The stream
        keeps order: a task's end arrives before Dask hears the task finished, and it is
        begun (taking its unfilled homes in one step) before a ``left`` of the writer,
        which the same stream's close triggers, settles what is left (callbacks run in
        the order they were scheduled)."""
        asyncio.ensure_future(self.end_write(dataset_id, holder, ticket, complete))

    async def end_write(
        self, dataset_id: int, holder: str, ticket: str = "", complete: list[int] | None = None
    ) -> dict:
        """The ticket ends; of the chunks it placed unfilled, those ``complete`` (every
        element written) stay, the others are freed first."""
        record = self.table.unsealed.get(dataset_id)
        if ticket:
            await self.homes.settle(record, dataset_id, (holder, ticket), set(complete or ()))
        key = (dataset_id, holder, ticket)
        if not self._open[key]:  # ended by its process's departure: a later ticket is not this one
            return {}
        self._open[key] -= 1
        if not self._open[key]:
            del self._open[key]
        if record is not None and record.writes[holder] > 0:
            record.writes[holder] -= 1
            if not record.writes[holder]:
                del record.writes[holder]
            await self._notify()
        return {}

    def _record_node(self, node: str | None) -> str:
        """The first writer's node if it runs the fabric, else the first live one."""
        live = self.members.live()
        return node if node in live else min(live, default="")

    def _home_message(self, record: DatasetRecord, flat: int, copy: Copy, unfilled: bool) -> ChunkHome:
        block = self.directory.blocks[copy.shm_id]
        return {
            "flat": flat,
            "type": _chunk_type(record, flat),
            "node": block.node,
            "worker": block.worker,
            "shm_id": copy.shm_id,
            "extent_offset": copy.extent_offset,
            "extent_id": copy.extent_id,
            "data_offset": copy.data_offset,
            "unfilled": unfilled,
        }

    async def _notify(self) -> None:
        async with self._idle:
            self._idle.notify_all()

    async def _until_no_writes(self, record: DatasetRecord) -> None:
        """No ticket and no placement of a home in flight: a placement outlives the ticket
        of a writer that died, and one recorded after the seal took the homes would leak."""

        def idle() -> bool:
            return not record.writes and not self.homes.busy(record.dataset_id)

        async with self._idle:
            await self._idle.wait_for(idle)

    # -- seal and end --------------------------------------------------------------------
    async def seal(self, name: str, dataset_id: int, holder: str) -> DatasetInfo:
        record = self.table.writable(name, dataset_id)
        record.state = SEALING  # no new ticket from here
        await self._until_no_writes(record)
        if record.state != SEALING:  # ended while it waited
            raise FabricError(f"dataset {name!r} was deleted while it was being sealed")
        flats = sorted(record.homes)
        try:  # in columns (yp/chunk_columns.py): no object per chunk
            columns = self.directory.seal_chunks(
                dataset_id, record.record_node, functools.partial(_chunk_type, record), record.homes
            )  # each chunk's doc names the record node, as its header says
        except FabricError:
            await self._end(record)  # a chunk's block is gone: nothing half-written becomes visible
            raise
        record.homes, record.claimed = {}, set()  # a sealed dataset takes no writes: its claims go
        self.homes.forget(dataset_id)
        await self.owners.mark_chunks(ExtentState.SEALED, columns)
        refused = None
        if record.state == SEALING:  # the record after the chunks' marks: invariant 1 of the rebuild
            try:
                await self._write_record(record, len(flats))
            except FabricError as exc:  # no room for it on its node, say
                refused = exc
        if record.state != SEALING or refused is not None:  # ended meanwhile, or refused: its chunks go
            if record.state == SEALING:
                self.table.remove(record)
                self.table.unsealed.pop(dataset_id, None)
            await self.records.delete(dataset_id)
            await self.deletes.delete_chunks([chunk_name(dataset_id, f) for f in flats])
            raise refused or FabricError(f"dataset {name!r} was deleted while it was being sealed")
        self.local.publish_columns(columns)
        table = np.full(record.nchunks, -1, np.int64)
        table[flats] = columns.first_id + np.arange(len(flats), dtype=np.int64)
        record.table, record.state = table, SEALED  # visible from this step on
        self.table.unsealed.pop(dataset_id, None)
        return record.message()

    async def _write_record(self, record: DatasetRecord, written: int) -> None:
        """Written, then sealed and marked, unless the dataset ended meanwhile."""
        record.record_node = record.record_node or self._record_node(None)
        item = await self.records.write(record, written)
        if record.state == SEALING:
            await self.records.commit(item)
        else:
            await self.records.give_back(item)

    async def abort(self, name: str, dataset_id: int) -> dict:
        record = self.table.lookup(name, dataset_id)
        if record.state == SEALED:
            return {}
        await self._end(record)
        return {}

    async def delete(self, name: str) -> dict:
        """A dataset's name disappears at once: a sealed one's record goes, then its chunks
        in one bulk delete (each freed when its last lease ends), an unsealed one's homes are
        freed once no write is in flight.  Other names are variables."""
        record = self.directory.datasets.get(name)
        if record is None:
            if is_chunk_name(name):  # its dataset would point at a variable that is gone
                raise InvalidNameError(
                    f"{name!r} is a dataset's chunk, one of the fabric's own variables: delete its dataset"
                )
            return await self.deletes.delete(name)
        if record.state != SEALED:
            await self._end(record)
            return {"freed": True}
        self.table.remove(record)
        await self.records.delete(record.dataset_id)  # before any chunk: a restart never sees part of it
        chunks = [
            var.name
            for var_id in record.table[record.table >= 0].tolist()
            if (var := self.directory.by_id.get(var_id)) is not None and self.directory.variables.get(var.name) is var
        ]
        # One bulk delete: marks and frees batched per owner, so O(owners) RPCs, not O(chunks).
        return {"freed": bool((await self.deletes.delete_chunks(chunks))["freed"]) if chunks else False}

    async def _end(self, record: DatasetRecord) -> None:
        if record.state == ENDING:
            return
        self.table.remove(record)
        await self._notify()  # a seal waiting on it gives up
        await self._until_no_writes(record)
        copies = [self.directory.drop_pending(c.shm_id, c.extent_offset) for c in record.homes.values()]
        record.homes, record.claimed = {}, set()
        self.homes.forget(record.dataset_id)
        self.table.unsealed.pop(record.dataset_id, None)
        await self.owners.free([c for c in copies if c is not None])

    # -- processes leaving -----------------------------------------------------------------
    def left(self, holder: str, later: Callable[[Callable[[], Awaitable[Any]]], None]) -> None:
        """A process left: its write tickets end (it writes nothing more), and the
        datasets it created and never sealed end with it."""
        for record in self.table.writing_to(holder):
            del record.writes[holder]
        for key in [k for k in self._open if k[1] == holder]:
            del self._open[key]
        for dataset_id, writer in self.homes.left(holder):  # its unfilled homes: filled, kept
            record = self.table.unsealed.get(dataset_id)
            later(lambda r=record, d=dataset_id, w=writer: self.homes.settle(r, d, w, set(), departed=True))
        later(self._notify)
        for record in self.table.created_by(holder):
            later(lambda r=record: self._end(r))

    # -- locality for dask graphs ----------------------------------------------------------
    def workers_for(self, name: str) -> list[str]:
        """Workers on the nodes holding chunk variable ``name`` (none if it is unknown)."""
        return self.members.workers_on(self.directory.nodes_of_chunk(name))  # none materialised


def _written(record: DatasetRecord) -> int:
    return 0 if record.table is None else int((record.table >= 0).sum())


def _chunk_type(record: DatasetRecord, flat: int) -> str:
    shape = chunk_shape(unravel(flat, grid_shape(record.shape, record.chunks)), record.shape, record.chunks)
    return sys.intern(chunk_type(record.element, shape))  # one string for every full-size chunk
