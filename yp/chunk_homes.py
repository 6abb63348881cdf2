"""Chunk homes of unsealed datasets: placed once per chunk, filled, or left unfilled for
the one writer that writes the chunk whole.

A chunk's home is a RESERVED extent made by its first writer's request.  One placement
per chunk is in flight at a time (``placing``): any other writer of the chunk waits for
it and is then given the same home, so a chunk never has two.

A **whole-writer** (a ticket that declares it writes every element of some of its chunks:
``from_dask``'s chunk tasks, imports, the zarr store's chunk writes) skips the fill: a
home it makes for such a chunk is placed **unfilled**, and its placement stays in flight
until that ticket ends (``docs/protocols.md``, "Unfilled homes").  So:

- nobody else is handed an unfilled home: other writers of the chunk wait, as for any
  placement in flight, and a write-once claim of it is refused;
- the seal and the end of a dataset wait for every placement in flight, so no unfilled
  home is ever sealed into a chunk variable, nor freed under its writer;
- the ticket ends by ``settle``: a chunk its writer confirms complete becomes an ordinary
  home (every element written); any other (the writer raised, was cancelled, or left:
  ``left`` settles a departed process's tickets with nothing confirmed) ends before its
  placement does, so the chunk reads as the fill value again, as if never written, and
  a write-once claim of it is dropped.  Its stale bytes never become readable.  A home
  whose writer raised or was cancelled is **freed** (its copy has returned: the end is
  sent after it), and the next writer of the chunk gets a home of its own; a home whose
  writer *left* is **filled** and kept instead, as its process may be alive and still
  copying into it, never into memory given to someone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from datafabric.errors import FabricError
from datafabric.names import chunk_name
from datafabric.types import from_datashape
from yp.dataset_table import SEALING, WRITING, DatasetRecord, holder_of
from yp.records import Block, Copy, shrunk

if TYPE_CHECKING:
    from yp.directory import Directory
    from yp.owners import Owners
    from yp.placement import Placement

Key = tuple[int, int]  # (dataset id, flat chunk index)
Writer = tuple[str, str]  # (holder, ticket) of a whole-writer's ticket


@dataclass
class ChunkHomes:
    directory: Directory
    placement: Placement
    owners: Owners
    changed: Callable[[], Awaitable[None]]  # wakes whoever waits for placements to end
    placing: dict[Key, asyncio.Event] = field(default_factory=dict)
    unfilled: dict[Key, Writer] = field(default_factory=dict)  # homes only their whole-writer may write
    reclaimable: set[Key] = field(default_factory=set)  # filled homes of departed whole-writers

    async def home(
        self, record: DatasetRecord, flat: int, node: str | None, ftype: str, writer: Writer | None
    ) -> tuple[Copy, bool]:
        """The chunk's home, made if it has none: (home, whether it was placed unfilled
        for ``writer``, a ticket writing the chunk whole)."""
        key = (record.dataset_id, flat)
        while (placing := self.placing.get(key)) is not None:
            await placing.wait()  # the same home for every writer, once filled or written whole
        if flat in record.homes:
            return record.homes[flat], False
        placing = self.placing[key] = asyncio.Event()
        kept = False
        try:
            copy = await self._make(record, flat, node, ftype, filled=writer is None)
            if writer is not None:
                self.unfilled[key] = writer  # its placement stays in flight until ``settle``
                kept = True
                self.directory.check_present(writer[0])  # left meanwhile: its ticket's end settles it
            return copy, kept
        finally:
            if not kept:
                await self._release([key])

    async def _make(self, record: DatasetRecord, flat: int, node: str | None, ftype: str, filled: bool) -> Copy:
        chunk = from_datashape(ftype)

        async def fill(block: Block, copy: Copy) -> None:
            if filled:
                await self._fill(block.worker, copy, record.fillvalue)
            if record.state not in (WRITING, SEALING):
                raise FabricError(f"dataset {record.name!r} ended while its chunk {flat} was being placed")

        name = chunk_name(record.dataset_id, flat)
        holder = holder_of(record.dataset_id)
        _, copy = await self.placement.reserve_filled(
            name, chunk.datashape, record.record_node, chunk.nbytes, node, holder, fill
        )
        record.homes[flat] = copy
        return copy

    async def settle(
        self,
        record: DatasetRecord | None,
        dataset_id: int,
        writer: Writer,
        complete: set[int],
        departed: bool = False,
    ) -> None:
        """A whole-writer's ticket ended: its chunks confirmed ``complete`` are ordinary
        homes from now on, the others are freed (they read as the fill value).  Each key
        is taken out of ``unfilled`` in one step, so two settles of a ticket (its end
        and its process leaving) free nothing twice.

        ``departed``: the writer's process left without ending the ticket.  Leaving is
        not dying (a client whose stream broke reconnects, a worker removed while its
        task runs): its copy may still be running, into the homes it maps.  So they are
        not freed but filled and kept as the chunk's, where such a copy lands harmlessly;
        the chunk reads as the fill value (or as what that copy still writes, as after
        any departed writer), and a write-once rerun may claim it (``reclaimable``)."""
        keys = [k for k, w in self.unfilled.items() if k[0] == dataset_id and w == writer]
        for key in keys:
            del self.unfilled[key]
        copies, refill = [], []
        try:
            for _, flat in keys:
                if flat in complete or record is None:
                    continue
                record.claimed.discard(flat)  # the chunk is as never written: it may be written again
                if departed:
                    refill.append(flat)
                    continue
                copy = record.homes.pop(flat, None)
                dropped = None if copy is None else self.directory.drop_pending(copy.shm_id, copy.extent_offset)
                if dropped is not None:
                    copies.append(dropped)
            if record is not None:
                copies += await self._refill(record, refill)
            await self.owners.free(copies)
        finally:
            await self._release(keys)

    async def _refill(self, record: DatasetRecord, flats: list[int]) -> list[Copy]:
        """Fill the homes of a departed whole-writer (their placements still in flight, so
        nobody else writes them meanwhile; an adoption of the block is waited for).  A
        home whose owner is gone is dropped instead: the copies to free."""
        lost = []
        for flat in flats:
            async with self.owners.moves.shared({record.homes[flat].shm_id}):
                copy = record.homes[flat]
                block = self.directory.blocks.get(copy.shm_id)
                try:
                    if block is None or block.worker is None:
                        raise FabricError(f"the block of chunk {flat}'s home has no owner now")
                    await self._fill(block.worker, copy, record.fillvalue)
                except FabricError:
                    del record.homes[flat]
                    dropped = self.directory.drop_pending(copy.shm_id, copy.extent_offset)
                    if dropped is not None:
                        lost.append(dropped)
                    continue
            self.reclaimable.add((record.dataset_id, flat))
        return lost

    async def _fill(self, worker: str, copy: Copy, value: bytes) -> None:
        """The home's owner writes the fill value over all of it (``fill_extent``, which
        acts only on an extent that still carries the copy's id)."""
        await self.owners.ask(
            worker,
            "fill_extent",
            shm_id=copy.shm_id,
            extent_offset=copy.extent_offset,
            extent_id=copy.extent_id,
            value=value,
        )

    def claimable(self, record: DatasetRecord, flat: int) -> bool:
        """Whether a write-once ticket may claim the chunk: no claim, no placement in
        flight, no home but a departed whole-writer's refilled one."""
        key = (record.dataset_id, flat)
        if flat in record.claimed or key in self.placing:
            return False
        return flat not in record.homes or key in self.reclaimable

    def forget(self, dataset_id: int) -> None:
        """The dataset's homes became chunk variables or were freed (in the step that
        took them: nothing is in flight across this)."""
        self.reclaimable = {k for k in self.reclaimable if k[0] != dataset_id}
        self.placing, self.unfilled = shrunk(self.placing), shrunk(self.unfilled)
        self.directory.pending = shrunk(self.directory.pending)

    def left(self, holder: str) -> list[tuple[int, Writer]]:
        """The tickets of a process that left with homes still unfilled: to settle."""
        return sorted({(k[0], w) for k, w in self.unfilled.items() if w[0] == holder})

    def busy(self, dataset_id: int) -> bool:
        return any(key[0] == dataset_id for key in self.placing)

    async def _release(self, keys: list[Key]) -> None:
        for key in keys:
            self.placing.pop(key).set()
        if keys:
            await self.changed()
