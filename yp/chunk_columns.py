"""Sealed datasets' chunk variables kept in columns, not as objects (scheduler memory).

A dataset of 100,000 chunks was 100,000 ``Variable``s, ``Copy``s, names and entries in
two dicts: about 530 bytes a chunk in the YellowPages.  The seal now records a dataset's
chunks in one ``ChunkColumns``: numpy arrays with, per chunk, its flat index and its one
copy (block, extent offset and size, the data's distance from the extent's start, extent
id), about 40 bytes a chunk.  Everything else follows: its var id is the dataset's first
id plus its position (the seal takes consecutive ids), its name ``chunk_name(dataset id,
flat)``, its type and size the dataset's shape, its doc the record node.

**A chunk in columns is a variable in its plainest state**: visible, one copy, no lease,
not deleted, not withheld, never moved since the seal.  Any protocol that needs more (a
lease, a move, a replica, a delete, an adoption, a kept view) reaches it through a look-up
by name (``variables``) or id (``by_id``), or through its block (``Directory.copies_in``),
and that look-up **materialises** it: in one step (no await) its column entry is marked
gone and an ordinary ``Variable`` built from it enters both dicts, with the workers told
of it (``told``, per block) as its local-lease publication.  From then on it is an
ordinary variable for good.  At no moment do two records of one chunk exist, so every
protocol's invariant is the one it has for any variable.  Iterations that only need
variables with leases, replicas or pending work (``drop_holder``, ``evictable``) skip the
columns, which hold none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
from sortedcontainers import SortedDict

from datafabric.messages import LocalEntry
from datafabric.names import RECORD_PART, chunk_name, dataset_part
from datafabric.types import from_datashape
from yp.records import Copy, Variable

GONE = -1  # a position's block index once materialised


@functools.lru_cache(maxsize=256)
def _nbytes(type_: str) -> int:
    return from_datashape(type_).nbytes


class ChunkColumns:
    """One sealed dataset's chunks; position ``i`` is var id ``first_id + i``, flats ascending."""

    __slots__ = ("dataset_id", "first_id", "doc", "type_of", "shm_ids", "flats", "block")
    __slots__ += ("extent_offset", "extent_size", "skip", "extent_id", "told", "left")

    def __init__(
        self, dataset_id: int, first_id: int, doc: str, type_of: Callable[[int], str], homes: dict[int, Copy]
    ) -> None:
        flats = sorted(homes)
        copies = [homes[f] for f in flats]
        self.dataset_id, self.first_id, self.doc, self.type_of = dataset_id, first_id, doc, type_of
        self.shm_ids = list(dict.fromkeys(c.shm_id for c in copies))
        index = {s: k for k, s in enumerate(self.shm_ids)}
        n = len(flats)
        self.flats = np.array(flats, np.int64)
        self.block = np.fromiter((index[c.shm_id] for c in copies), np.int32, n)
        self.extent_offset = np.fromiter((c.extent_offset for c in copies), np.int64, n)
        self.extent_size = np.fromiter((c.extent_size for c in copies), np.int64, n)
        self.skip = np.fromiter((c.skip for c in copies), np.int32, n)
        self.extent_id = np.fromiter((c.extent_id for c in copies), np.int64, n)
        # Per block index: the workers told of every chunk of that block still here (local
        # leases).  A chunk materialised takes its block's set as its own publication.
        self.told: dict[int, frozenset[str]] = {}
        self.left = n  # positions not materialised

    def __len__(self) -> int:
        return len(self.flats)

    def position(self, flat: int) -> int | None:
        i = int(np.searchsorted(self.flats, flat))
        return i if i < len(self.flats) and self.flats[i] == flat and self.block[i] != GONE else None

    def name(self, i: int) -> str:
        return chunk_name(self.dataset_id, int(self.flats[i]))

    def copy(self, i: int) -> Copy:
        offset = int(self.extent_offset[i])
        shm_id = self.shm_ids[self.block[i]]
        return Copy(shm_id, offset, int(self.extent_size[i]), offset + int(self.skip[i]), int(self.extent_id[i]))

    def variable(self, i: int) -> Variable:
        type_ = self.type_of(int(self.flats[i]))
        return Variable(self.first_id + i, self.name(i), self.doc, type_, _nbytes(type_), [self.copy(i)])

    def in_block(self, shm_id: str) -> np.ndarray:
        """Positions still here whose copy is in block ``shm_id``."""
        try:
            k = self.shm_ids.index(shm_id)
        except ValueError:
            return np.empty(0, np.int64)
        return np.flatnonzero(self.block == k)

    def at(self, shm_id: str, data_offset: int) -> int | None:
        found = self.in_block(shm_id)
        hits = found[(self.extent_offset[found] + self.skip[found]) == data_offset]
        return int(hits[0]) if len(hits) else None

    def local_entry(self, i: int) -> LocalEntry:
        copy = self.copy(i)
        return {
            "var_id": self.first_id + i,
            "name": self.name(i),
            "type": self.type_of(int(self.flats[i])),
            "shm_id": copy.shm_id,
            "data_offset": copy.data_offset,
            "extent_id": copy.extent_id,
        }


Found = tuple[ChunkColumns, int]


class ColumnStore:
    """Every dataset's columns, found by a chunk's name or var id; owns the directory's
    ``variables`` and ``by_id``, which materialise a chunk looked up in them."""

    def __init__(self) -> None:
        self.by_dataset: dict[int, ChunkColumns] = {}
        self._by_first: SortedDict = SortedDict()  # first var id -> columns
        self.variables = Names(self)
        self.by_id = Ids(self)
        self.published: dict[int, frozenset[str]] = {}  # var id -> workers told (yp.local_leases)

    def add(self, columns: ChunkColumns) -> None:
        if columns.left:
            self.by_dataset[columns.dataset_id] = columns
            self._by_first[columns.first_id] = columns

    def __iter__(self) -> Iterator[ChunkColumns]:
        return iter(list(self.by_dataset.values()))

    def by_name(self, name: object) -> Found | None:
        if not self.by_dataset or not isinstance(name, str):
            return None
        found = dataset_part(name)
        if found is None or found[1] == RECORD_PART or (columns := self.by_dataset.get(found[0])) is None:
            return None
        i = columns.position(int(found[1]))
        return None if i is None or columns.name(i) != name else (columns, i)

    def by_var_id(self, var_id: object) -> Found | None:
        if not self._by_first or not isinstance(var_id, int):
            return None
        k = self._by_first.bisect_right(var_id) - 1
        if k < 0:
            return None
        columns = self._by_first.peekitem(k)[1]
        i = var_id - columns.first_id
        return (columns, i) if i < len(columns) and columns.block[i] != GONE else None

    def materialise(self, found: Found) -> Variable:
        """The chunk becomes an ordinary variable, in one step: its entry goes first (the
        sorted index adds a name only if it is not already there)."""
        columns, i = found
        var = columns.variable(i)
        told = columns.told.get(int(columns.block[i]))
        columns.block[i] = GONE
        columns.left -= 1
        if not columns.left:
            del self.by_dataset[columns.dataset_id], self._by_first[columns.first_id]
        self.variables[var.name] = self.by_id[var.var_id] = var
        if told:
            self.published[var.var_id] = told
        return var

    def materialise_block(self, shm_id: str) -> None:
        for columns in self:
            for i in columns.in_block(shm_id).tolist():
                self.materialise((columns, i))

    def named_copies(self, columns: ChunkColumns) -> list[tuple[str, Copy]]:
        """Each chunk's name and copy as they are now, in columns or materialised (one gone
        since is left out)."""
        named = []
        for i in range(len(columns)):
            if columns.block[i] != GONE:
                named.append((columns.name(i), columns.copy(i)))
            elif (var := self.by_id.known(columns.first_id + i)) is not None and var.copies:
                named.append((var.name, var.copies[0]))
        return named

    def names_in(self, shm_ids: set[str]) -> list[str]:
        return [c.name(i) for c in self for s in shm_ids for i in c.in_block(s).tolist()]


class _Materialising:
    """A table of variables in which a chunk still in columns counts as present and is
    materialised when looked up; ``_find`` says where a key's chunk is in columns."""

    _store: ColumnStore | None

    def _find(self, key: object) -> Found | None:
        raise NotImplementedError

    def __missing__(self, key: object) -> Variable:
        found = self._find(key)
        if found is None:
            raise KeyError(key)
        return self._store.materialise(found)

    def get(self, key: object, default: Variable | None = None) -> Variable | None:
        var = dict.get(self, key)
        if var is None and (found := self._find(key)) is not None:
            return self._store.materialise(found)
        return default if var is None else var

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._find(key) is not None


class Names(_Materialising, SortedDict):
    """Visible variables by name, sorted."""

    def __init__(self, store: ColumnStore | None) -> None:
        super().__init__()
        self._store = store

    def __reduce__(self) -> tuple:
        """Pickled with the plugin: the items are set before the store is (``__contains__``
        finds no columns meanwhile), so the cycle through the store is no recursion."""
        return (Names, (None,), {"_store": self._store}, None, iter(dict.items(self)))

    def _find(self, name: object) -> Found | None:
        return None if self._store is None else self._store.by_name(name)


class Ids(_Materialising, dict):
    """Variables by id (visible and deleted-but-leased)."""

    def __init__(self, store: ColumnStore) -> None:
        super().__init__()
        self._store = store

    def _find(self, var_id: object) -> Found | None:
        return self._store.by_var_id(var_id)

    def known(self, var_id: int) -> Variable | None:
        """The variable if it is materialised; None for a chunk in columns (not built)."""
        return dict.get(self, var_id)
