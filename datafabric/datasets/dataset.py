"""The ``Dataset`` handle: h5py's ``Dataset`` on the fabric.

It pickles to its fabric and the dataset's record (a few hundred bytes, plus one bit
per chunk once sealed), so it works in tasks.  Reads go through ``read_chunks``, the one
place that turns chunk variables into views (today ``fabric.get`` each; a batched get
can replace it there).  A read inside one chunk is that chunk's zero-copy view, sliced;
any other read is assembled with one copy of the selected bytes.  A chunk never written
reads as the fill value and takes no memory (a broadcast view of one element).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from datafabric.datasets import writes
from datafabric.datasets.grid import chunk_count, chunk_shape, grid_shape, ravel, unravel
from datafabric.datasets.selection import Selection
from datafabric.errors import DatasetWritingError, FabricError, InvalidSelectionError, NameNotFoundError
from datafabric.messages import DatasetInfo
from datafabric.names import chunk_name
from datafabric.types import from_datashape

_WHOLE = slice(None)


def read_chunks(fabric: Any, names: list[str]) -> list[np.ndarray]:
    """Zero-copy views of chunk variables, in order: none costs a round trip in a task on a
    node holding them all, and one in all elsewhere."""
    return fabric.get_many(names) if names else []


class Dataset:
    """``name shape dtype ndim size nbytes chunks attrs doc fillvalue``, ``len()``,
    ``ds[...]`` to read (once sealed) and, until ``seal()``, to write."""

    def __init__(self, fabric: Any, info: DatasetInfo) -> None:
        self._fabric = fabric
        self._update(info)

    def _update(self, info: DatasetInfo) -> None:
        self._info = info
        self.name: str = info["name"]
        self.id: int = info["dataset_id"]
        self.shape: tuple[int, ...] = tuple(info["shape"])
        self.chunks: tuple[int, ...] = tuple(info["chunks"])
        self.dtype: np.dtype = from_datashape(info["element"]).dtype
        self.doc: str = info["doc"]
        self.attrs: dict = info["attrs"]
        self._fill = np.frombuffer(info["fillvalue"], self.dtype).reshape(())
        self._grid = grid_shape(self.shape, self.chunks)
        count = chunk_count(self.shape, self.chunks)
        self._written = (
            np.unpackbits(np.frombuffer(info["written"], np.uint8), count=count).astype(bool)
            if info["sealed"]
            else None
        )

    def __reduce__(self) -> tuple:
        return (Dataset, (self._fabric, self._info))

    # -- h5py's attributes -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def fillvalue(self) -> Any:
        return self._fill[()]

    @property
    def sealed(self) -> bool:
        return self._written is not None

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("a scalar dataset has no len()")
        return self.shape[0]

    def __repr__(self) -> str:
        state = "sealed" if self.sealed else "writing"
        return f"<Dataset {self.name!r}: shape {self.shape}, {self.dtype}, chunks {self.chunks}, {state}>"

    # -- reading -----------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if self._written is not None:  # sealed: the common read inside one chunk needs no Selection
            view = self._one_chunk(key)
            if view is not None:
                return view
        self._check_readable()
        sel = Selection(key, self.shape)
        pieces = list(sel.pieces(self.chunks))
        if not pieces:
            return sel.orient(np.empty(sel.shape, self.dtype))
        views = self._views([ravel(p.index, self._grid) for p in pieces])
        if len(pieces) == 1:
            return sel.orient(views[0][pieces[0].local])  # one chunk: a view of it
        out = np.empty(sel.shape, self.dtype)
        for piece, view in zip(pieces, views, strict=True):
            out[piece.out] = view[piece.local]
        return sel.orient(out)

    def _one_chunk(self, key: Any) -> np.ndarray | None:
        """The fast path of a read: ``key`` an int, a slice with no step, or a tuple of them
        (dimensions not given are whole), selecting a non-empty region inside one chunk;
        its view of that chunk, or None for anything else (the general path decides, and
        says what is wrong with a bad key).  Same result as the general path, with none of
        its objects: a warm read is then a cached ``get`` and one numpy slice."""
        items = key if type(key) is tuple else (key,)
        if len(items) > len(self.shape):
            return None
        flat = 0
        local: list[int | slice] = []
        for axis, (n, c, g) in enumerate(zip(self.shape, self.chunks, self._grid, strict=True)):
            k = items[axis] if axis < len(items) else _WHOLE
            if type(k) is int:
                i = k + n if k < 0 else k
                if not 0 <= i < n:
                    return None
                q, r = divmod(i, c)
                local.append(r)
            elif type(k) is slice and k.step is None:
                start, stop = k.start, k.stop
                if not (start is None or type(start) is int) or not (stop is None or type(stop) is int):
                    return None
                start, stop, _ = k.indices(n)
                if stop <= start:
                    return None
                q = start // c
                if (stop - 1) // c != q:
                    return None
                local.append(slice(start - q * c, stop - q * c))
            else:
                return None
            flat = flat * g + q
        if not self._written[flat]:
            return self._fill_view(flat)[tuple(local)]
        try:
            view = self._fabric.get(chunk_name(self.id, flat))
        except NameNotFoundError:
            raise NameNotFoundError(f"dataset {self.name!r} was deleted; fabric.datasets() lists them") from None
        return view[tuple(local)]

    def chunk(self, index: int | tuple[int, ...]) -> np.ndarray:
        """The zero-copy view of one chunk, by its grid index (an int for 1-d)."""
        self._check_readable()
        index = (index,) if isinstance(index, int) else tuple(index)
        if len(index) != self.ndim or not all(0 <= k < g for k, g in zip(index, self._grid, strict=True)):
            raise InvalidSelectionError(f"chunk {index} is outside the chunk grid {self._grid} of {self.name!r}")
        return self._views([ravel(index, self._grid)])[0]

    def chunk_name(self, flat: int) -> str | None:
        """The variable holding chunk ``flat`` (C order), None if it was never written."""
        self._check_readable()
        return chunk_name(self.id, flat) if self._written[flat] else None

    def _views(self, flats: list[int]) -> list[np.ndarray]:
        names = [chunk_name(self.id, f) for f in flats if self._written[f]]
        try:
            got = iter(read_chunks(self._fabric, names))
        except NameNotFoundError:
            raise NameNotFoundError(f"dataset {self.name!r} was deleted; fabric.datasets() lists them") from None
        return [next(got) if self._written[f] else self._fill_view(f) for f in flats]

    def _fill_view(self, flat: int) -> np.ndarray:
        return np.broadcast_to(self._fill, chunk_shape(unravel(flat, self._grid), self.shape, self.chunks))

    def _check_readable(self) -> None:
        if self._written is None:
            self._update(self._fabric._ctx().call("dataset_open", name=self.name))
            if self._written is None:
                raise DatasetWritingError(
                    f"dataset {self.name!r} is still being written; read it once sealed (ds.seal(), or the "
                    "end of its with block)"
                )

    # -- writing -----------------------------------------------------------------------
    def __setitem__(self, key: Any, values: Any) -> None:
        writes.write(self, Selection(key, self.shape), values)

    def seal(self) -> Dataset:
        """Every chunk written so far becomes read-only, then the dataset is visible, in
        one step; no write may be in flight from then on (the seal waits for those that are)."""
        ctx = self._fabric._ctx()
        self._update(ctx.call("dataset_seal", name=self.name, dataset_id=self.id, holder=ctx.holder))
        return self

    def abort(self) -> None:
        """Discard an unsealed dataset: its name goes at once, its memory once no write is in flight."""
        self._fabric._ctx().call("dataset_abort", name=self.name, dataset_id=self.id)

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.sealed:
            return
        if exc_type is None:
            try:
                self.seal()
            except FabricError:  # refused (no room for its record, say): a with block leaves nothing unsealed
                with contextlib.suppress(FabricError):  # a sealed one (its answer lost) is left as it is
                    self.abort()
                raise
        else:
            self.abort()

    # -- dask ----------------------------------------------------------------------------
    def to_dask(self) -> Any:
        """A dask array of this dataset, one task per chunk, each run on a worker of a
        node holding its chunk and handed the chunk's zero-copy view."""
        from datafabric.datasets.dask import to_dask

        return to_dask(self)
