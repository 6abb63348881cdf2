"""The YellowPages' datasets: their records and chunk tables (no Dask).

A dataset owns write-once variables, one per chunk ever written, named
``names.chunk_name(dataset_id, flat)``: a namespace no user name can enter, and a fresh
id per dataset, so a dataset deleted while its chunks are read and created again never
meets its old chunks.  ``get_list`` and ``info`` show the dataset as one entry; its chunk
variables are hidden.  The seal keeps them in columns (``yp/chunk_columns.py``), not as
one ``Variable`` each, until a protocol needs one.

While **writing**, ``homes`` maps each chunk begun to its RESERVED extent (a pending
reservation of the dataset's own holder, ``holder_of(dataset_id)``, which no process
departure ends: the dataset's end frees it, once no write is in flight).  ``writes``
counts the write tickets in flight per process.  Once **sealed**, ``table`` is the chunk
table: one int64 per chunk, the id of the variable holding it, or -1 for a chunk never
written (it reads as ``fillvalue`` and takes no memory).  Eight bytes a chunk, whatever
the dataset's shape; a later version of a dataset can point a chunk at another
dataset's variable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from datafabric.datasets.grid import chunk_count
from datafabric.errors import DatasetSealedError, DatasetWritingError, NameExistsError, NameNotFoundError
from datafabric.messages import DatasetInfo
from yp.records import Copy

WRITING, SEALING, SEALED, ENDING = "writing", "sealing", "sealed", "ending"


def holder_of(dataset_id: int) -> str:
    """The holder of a dataset's chunk reservations: no process, so none leaving ends them."""
    return f"dataset:{dataset_id}"


@dataclass(slots=True)
class DatasetRecord:
    dataset_id: int
    name: str
    shape: tuple[int, ...]
    element: str
    chunks: tuple[int, ...]
    fillvalue: bytes
    doc: str
    attrs: dict
    creator: str  # the process whose departure ends the dataset while it is unsealed
    state: str = WRITING
    record_node: str = ""  # where its record goes at the seal; every home's header names it (its doc)
    homes: dict[int, Copy] = field(default_factory=dict)
    claimed: set[int] = field(default_factory=set)  # chunks a write-once ticket took
    writes: Counter = field(default_factory=Counter)
    table: np.ndarray | None = None

    @property
    def nchunks(self) -> int:
        return chunk_count(self.shape, self.chunks)

    def message(self) -> DatasetInfo:
        written = b"" if self.table is None else np.packbits(self.table >= 0).tobytes()
        return {
            "dataset_id": self.dataset_id,
            "name": self.name,
            "shape": list(self.shape),
            "element": self.element,
            "chunks": list(self.chunks),
            "fillvalue": self.fillvalue,
            "doc": self.doc,
            "attrs": self.attrs,
            "sealed": self.state == SEALED,
            "written": written,
        }


class DatasetTable:
    """Datasets by name, in the directory's own dict: names are shared with variables."""

    def __init__(self, by_name: dict[str, DatasetRecord], variables: dict) -> None:
        self.by_name = by_name
        self.variables = variables
        self.unsealed: dict[int, DatasetRecord] = {}  # by id: writing, sealing, or ending with writes in flight

    def add(self, record: DatasetRecord) -> None:
        if record.name in self.by_name or record.name in self.variables:
            raise NameExistsError(f"{record.name!r} exists already; delete it first or choose another name")
        self.by_name[record.name] = record
        self.unsealed[record.dataset_id] = record

    def lookup(self, name: str, dataset_id: int | None = None) -> DatasetRecord:
        record = self.by_name.get(name)
        if record is None or (dataset_id is not None and record.dataset_id != dataset_id):
            raise NameNotFoundError(f"no dataset named {name!r}; fabric.datasets() lists them")
        return record

    def writable(self, name: str, dataset_id: int) -> DatasetRecord:
        record = self.lookup(name, dataset_id)
        if record.state != WRITING:
            raise DatasetSealedError(f"dataset {name!r} is {record.state}: it is read-only once sealed")
        return record

    def sealed(self, name: str) -> DatasetRecord | None:
        record = self.by_name.get(name)
        return record if record is not None and record.state == SEALED else None

    def readable(self, name: str) -> DatasetRecord:
        record = self.lookup(name)
        if record.state != SEALED:
            raise DatasetWritingError(
                f"dataset {name!r} is still being written; it can be read once sealed (ds.seal(), or the end "
                "of its with block)"
            )
        return record

    def remove(self, record: DatasetRecord) -> None:
        """The name disappears at once (its memory goes once no write is in flight)."""
        if self.by_name.get(record.name) is record:
            del self.by_name[record.name]
        record.state = ENDING

    def names(self, prefix: str = "", limit: int | None = None, after: str | None = None) -> list[str]:
        """A page of the sealed datasets' names, as ``Directory.names`` pages variables'
        (a scan of the datasets: they are few beside their chunks)."""
        found = sorted(
            n
            for n, r in self.by_name.items()
            if r.state == SEALED and n.startswith(prefix) and (after is None or n > after)
        )
        return found if limit is None else found[:limit]

    def count(self, prefix: str = "") -> int:
        return sum(1 for n, r in self.by_name.items() if r.state == SEALED and n.startswith(prefix))

    def created_by(self, holder: str) -> list[DatasetRecord]:
        return [r for r in self.unsealed.values() if r.creator == holder and r.state in (WRITING, SEALING)]

    def writing_to(self, holder: str) -> list[DatasetRecord]:
        return [r for r in self.unsealed.values() if r.writes[holder]]
