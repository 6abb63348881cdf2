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
  ``left`` settles a departed process's tickets with nothing confirmed) is **freed**
  before its placement ends, so the chunk reads as the fill value again, as if never
  written, and a write-once claim of it is dropped.  Its stale bytes never become
  readable, and the next writer of the chunk gets a home of its own.
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
from yp.records import Block, Copy

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
                await self.owners.ask(
                    block.worker,
                    "fill_extent",
                    shm_id=block.shm_id,
                    extent_offset=copy.extent_offset,
                    extent_id=copy.extent_id,
                    value=record.fillvalue,
                )
            if record.state not in (WRITING, SEALING):
                raise FabricError(f"dataset {record.name!r} ended while its chunk {flat} was being placed")

        name = chunk_name(record.dataset_id, flat)
        holder = holder_of(record.dataset_id)
        _, copy = await self.placement.reserve_filled(
            name, chunk.datashape, record.record_node, chunk.nbytes, node, holder, fill
        )
        record.homes[flat] = copy
        return copy

    async def settle(self, record: DatasetRecord | None, dataset_id: int, writer: Writer, complete: set[int]) -> None:
        """A whole-writer's ticket ended: its chunks confirmed ``complete`` are ordinary
        homes from now on, the others are freed (they read as the fill value).  Each key
        is taken out of ``unfilled`` in one step, so two settles of a ticket (its end
        and its process leaving) free nothing twice."""
        keys = [k for k, w in self.unfilled.items() if k[0] == dataset_id and w == writer]
        for key in keys:
            del self.unfilled[key]
        copies = []
        try:
            for _, flat in keys:
                if flat in complete or record is None:
                    continue
                record.claimed.discard(flat)  # the chunk is as never written: it may be written again
                copy = record.homes.pop(flat, None)
                dropped = None if copy is None else self.directory.drop_pending(copy.shm_id, copy.extent_offset)
                if dropped is not None:
                    copies.append(dropped)
            await self.owners.free(copies)
        finally:
            await self._release(keys)

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
