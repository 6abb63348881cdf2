"""Sealed datasets that outlive the scheduler: each one's record, a hidden variable.

The YellowPages keeps datasets in memory only, and a restarted one rebuilds its
directory from the block headers (``Membership.recover``).  So the seal writes the
dataset's **record** (name, shape, element type, chunk shape, fill value, doc, attrs and
how many chunks were written) as a write-once variable of its own, named
``names.record_name(id)``, in a block of the dataset's **record node**; its header says
SEALED before the dataset becomes visible.  What the rebuild relies on:

1. **A record found means the whole dataset.** A record's header says SEALED only after
   the header of every chunk it counts says SEALED (the seal marks the chunks first), and
   ``delete`` deletes the record before any chunk.  Chunk names are write-once and carry
   the dataset's id, so the dataset is back, exactly as sealed, once that many of its
   chunks are known; until then some are on nodes not back yet, and it is not listed.
2. **A chunk without its record, on a node that is back, goes.** Every home's header names
   the record node (its doc) from its reservation on.  Once a worker of that node has
   registered and its blocks are taken back, a chunk whose record is not among them
   belongs to a seal or a delete the scheduler's death cut short: it is deleted (freed
   once unleased: the take-back's round holds it until the views kept through the crash
   are declared), as the seal or delete would have done.
3. **Only a dead YellowPages' datasets are rebuilt.** Ids of this YellowPages' datasets are
   at least its ``first_id``; the rebuild looks at smaller ids only, so a seal in progress
   now (chunks sealed, record not yet) is never taken for one cut short.

An unsealed dataset has no record: its homes are RESERVED extents, which every take-back
frees (when its round ends, ``yp/declarations.py``), so it does not come back and its memory
returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from distributed.protocol import to_serialize
from distributed.protocol.serialize import Serialized, deserialize

from datafabric.errors import FabricError, NameNotFoundError
from datafabric.layout import ExtentState
from datafabric.messages import SealItem
from datafabric.names import CHUNK_PREFIX, RECORD_PART, dataset_part, record_name
from datafabric.types import parse_type
from yp.dataset_table import SEALED, DatasetRecord, DatasetTable, holder_of
from yp.directory import Directory
from yp.records import Variable

if TYPE_CHECKING:
    from yp.deletes import Deletes
    from yp.owners import Owners
    from yp.placement import Placement
    from yp.reads import Reads

logger = logging.getLogger("datafabric.yp")

REBUILD_HOLDER = "dataset-rebuild"  # the lease the rebuild reads a record under (no process)


def encode(record: DatasetRecord, written: int) -> bytes:
    return json.dumps(
        {
            "name": record.name,
            "shape": list(record.shape),
            "element": record.element,
            "chunks": list(record.chunks),
            "fillvalue": record.fillvalue.hex(),
            "doc": record.doc,
            "attrs": record.attrs,
            "written": written,
        }
    ).encode()


def decode(dataset_id: int, record_node: str, data: bytes, chunks: dict[int, Variable]) -> DatasetRecord:
    """The sealed dataset a record describes, its chunk table pointing at ``chunks``."""
    meta = json.loads(data)
    record = DatasetRecord(
        dataset_id,
        meta["name"],
        tuple(meta["shape"]),
        meta["element"],
        tuple(meta["chunks"]),
        bytes.fromhex(meta["fillvalue"]),
        meta["doc"],
        meta["attrs"],
        creator="",
        state=SEALED,
        record_node=record_node,
    )
    table = np.full(record.nchunks, -1, np.int64)
    table[list(chunks)] = [v.var_id for v in chunks.values()]
    record.table = table
    return record


@dataclass
class DatasetRecords:
    directory: Directory
    placement: Placement
    owners: Owners
    reads: Reads
    deletes: Deletes
    table: DatasetTable
    back: set[str] = field(default_factory=set)  # nodes whose blocks were taken back
    rebuilt: set[int] = field(default_factory=set)  # ids of datasets made visible again
    _read: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # records read: (bytes, chunks counted)
    _rebuilding: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- the seal's side -----------------------------------------------------------------
    async def write(self, record: DatasetRecord, written: int) -> SealItem:
        """The record, written and RESERVED on the record node (only there: invariant 2)."""
        data = encode(record, written)
        ftype = parse_type(f"{len(data)} * uint8")
        name = record_name(record.dataset_id)
        block, r = await self.placement.reserve(
            name,
            ftype.datashape,
            record.record_node,
            len(data),
            record.record_node,
            holder_of(record.dataset_id),
            only_node=True,
        )
        item: SealItem = {
            "name": name,
            "doc": record.record_node,
            "type": ftype.datashape,
            "nbytes": len(data),
            **{k: r[k] for k in ("shm_id", "extent_offset", "extent_size", "data_offset", "extent_id")},
        }
        try:
            await self.owners.ask(
                block.worker,
                "write",
                **{k: r[k] for k in ("shm_id", "extent_offset", "extent_id", "data_offset")},
                data=to_serialize(data),
            )
        except BaseException:
            await self.give_back(item)
            raise
        return item

    async def give_back(self, item: SealItem) -> None:
        dropped = self.directory.drop_pending(item["shm_id"], item["extent_offset"])
        await self.owners.free([dropped] if dropped is not None else [])

    async def commit(self, item: SealItem) -> None:
        """The seal's last step before the dataset is visible: the record's header says
        SEALED when this returns (the chunks' headers said so before)."""
        var = self.directory.seal(item)
        await self.owners.mark(ExtentState.SEALED, [(var.name, var.copies[0])])

    async def delete(self, dataset_id: int) -> None:
        """Before any chunk (invariant 1)."""
        name = record_name(dataset_id)
        if name in self.directory.variables:
            await self.deletes.delete(name)

    # -- the rebuild ---------------------------------------------------------------------
    async def node_back(self, node: str, took_back: bool) -> None:
        """A worker of ``node`` registered and every block it listed is known.  With nothing
        ever taken back there is nothing to rebuild (a scan of the hidden names is saved)."""
        self.back.add(node)
        if not took_back:
            return
        async with self._rebuilding:  # one at a time: each reads the directory as the last left it
            await self._rebuild()

    async def _rebuild(self) -> None:
        parts: dict[int, dict[str, Variable]] = defaultdict(dict)
        for name in self.directory.names(CHUNK_PREFIX):
            found = dataset_part(name)
            if found is not None and found[0] < self.directory.first_id and found[0] not in self.rebuilt:
                parts[found[0]][found[1]] = self.directory.variables[name]
        for dataset_id, named in parts.items():
            try:
                await self._rebuild_one(dataset_id, named)
            except FabricError as exc:  # an owner died or a name went meanwhile: the next take-back tries again
                logger.warning("dataset %d not rebuilt yet: %r", dataset_id, exc)

    async def _rebuild_one(self, dataset_id: int, named: dict[str, Variable]) -> None:
        record_var = named.pop(RECORD_PART, None)
        if record_var is None:
            await self._drop_cut_short(dataset_id, named)
            return
        chunks = {int(part): var for part, var in named.items()}
        data = await self._record_bytes(dataset_id, record_var)
        if data is not None and json.loads(data)["written"] == len(chunks):
            await self._make_visible(dataset_id, record_var, data, chunks)

    async def _drop_cut_short(self, dataset_id: int, chunks: dict[str, Variable]) -> None:
        doomed = [v for v in chunks.values() if v.doc in self.back]
        if doomed:
            logger.warning(
                "dataset %d: %d chunk(s) without a record on node %s (a seal or delete cut short): deleting them",
                dataset_id,
                len(doomed),
                doomed[0].doc,
            )
        for var in doomed:
            try:
                await self.deletes.delete(var.name)
            except NameNotFoundError:
                pass  # a client's delete_many of the hidden range cannot name it; nothing else deletes it

    async def _record_bytes(self, dataset_id: int, var: Variable) -> bytes | None:
        cached = self._read.get(dataset_id)
        if cached is not None and cached[1] == var.var_id:
            return cached[0]
        info = await self.reads.acquire(var.name, REBUILD_HOLDER)
        try:
            for (_, shm_id, data_offset), worker in zip(info["locations"], info["workers"], strict=True):
                if worker is None:
                    continue
                answer = await self.owners.ask(
                    worker, "read", shm_id=shm_id, data_offset=data_offset, nbytes=var.nbytes
                )
                data = answer["data"]
                if isinstance(data, Serialized):  # the scheduler's comms leave payloads serialized
                    data = deserialize(data.header, data.frames)
                data = bytes(data)
                self._read[dataset_id] = (data, var.var_id)
                return data
            return None  # every copy is being adopted: the next take-back tries again
        finally:
            self.owners.free_later(self.directory.release(info["var_id"], REBUILD_HOLDER))

    async def _make_visible(
        self, dataset_id: int, record_var: Variable, data: bytes, chunks: dict[int, Variable]
    ) -> None:
        record = decode(dataset_id, record_var.doc, data, chunks)
        self._read.pop(dataset_id, None)
        self.rebuilt.add(dataset_id)
        if record.name in self.directory.variables or record.name in self.directory.datasets:
            logger.error(
                "dataset %r is back after the restart, but its name was taken meanwhile: deleting the dataset",
                record.name,
            )
            await self.delete(dataset_id)
            for var in chunks.values():
                await self.deletes.delete(var.name)
            return
        self.table.by_name[record.name] = record
        logger.info("dataset %r is back: %d chunk(s) written of %d", record.name, len(chunks), record.nchunks)
