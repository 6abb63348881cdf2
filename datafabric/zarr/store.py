"""``FabricStore``: the fabric's datasets as a zarr v3 store.

A dataset named ``prefix + path`` is the zarr array at ``path``; a group is every name
under ``prefix + path + "/"``.  Nothing is stored for zarr but the datasets themselves:
metadata documents are generated from the datasets on each read.

Reading: ``<path>/zarr.json`` is the array metadata of a dataset (``metadata.py``), or
a group's, with its sealed datasets and subgroups as consolidated metadata (so
``xarray.open_zarr`` opens the hierarchy in one read).  A chunk key ``<path>/c/i/j`` is
the chunk's bytes: zero-copy from the chunk's fabric view when the chunk is whole (the
buffer is a view of the view, so it holds the chunk's lease until zarr drops it: the
dataset may be deleted meanwhile, its memory is freed after); an edge chunk, clipped
in the fabric, is padded to zarr's chunk shape with the fill value (one copy).  A chunk
never written is absent: zarr fills it.  A dataset still being written is not read.

Writing: array metadata written through the store creates an unsealed dataset (the
same document again is a no-op; one that changes it is refused); chunk writes go to
the chunk's memory as a write-once write: a chunk written (or claimed) before is
refused with ``ChunkWrittenError``, nothing changed.  zarr deletes a chunk whose values
are all the fill value instead of writing it; here that writes the fill value, once,
like any chunk.  ``close()`` (or the end of ``with FabricStore(...) as store:``) seals
the datasets this store object created; the end of a ``with`` block an exception left
aborts them instead.  A pickled store is its fabric and prefix only (tasks write
through their copy; the creating process seals).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from datafabric.datasets import writes
from datafabric.datasets.dataset import Dataset
from datafabric.datasets.grid import chunk_shape, ravel
from datafabric.datasets.selection import Selection
from datafabric.errors import (
    ChunkWrittenError,
    DatasetSealedError,
    DatasetWritingError,
    FabricError,
    InvalidArgumentError,
    InvalidNameError,
    NameNotFoundError,
)
from datafabric.zarr import metadata as md

METADATA = "zarr.json"


class FabricStore(Store):
    """A zarr v3 store over ``fabric``'s datasets named ``prefix + path``.  ``prefix``:
    "" (every dataset) or a group, with or without its trailing "/"."""

    supports_writes = True
    supports_deletes = True
    supports_listing = True

    def __init__(self, fabric: Any, prefix: str = "", *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"prefix must be a str, not {type(prefix).__name__}")
        self.fabric = fabric
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._sealed: dict[str, Dataset] = {}  # sealed datasets never change: a chunk read costs no lookup
        self._writing: dict[str, Dataset] = {}  # unsealed handles this process writes through
        self._created: dict[str, Dataset] = {}  # what close() seals

    def __reduce__(self) -> tuple:
        return (_store, (self.fabric, self.prefix, self.read_only))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FabricStore)
            and (other.fabric.address, other.fabric.fabric_id) == (self.fabric.address, self.fabric.fabric_id)
            and other.prefix == self.prefix
            and other.read_only == self.read_only
        )

    def __repr__(self) -> str:
        return f"FabricStore({self.fabric!r}, prefix={self.prefix!r})"

    def with_read_only(self, read_only: bool = False) -> FabricStore:
        return FabricStore(self.fabric, self.prefix, read_only=read_only)

    # -- sealing ------------------------------------------------------------------------
    def close(self) -> None:
        """Seal every dataset this store object created: readable from then on."""
        while self._created:
            _, ds = self._created.popitem()
            self._writing.pop(ds.name, None)
            ds.seal()
        super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        while self._created:
            _, ds = self._created.popitem()
            ds.abort()

    # -- the async API zarr calls: each is the sync method below, off zarr's event loop ----
    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await asyncio.to_thread(self.get_sync, key, prototype=prototype, byte_range=byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.exists_sync, key)

    async def set(self, key: str, value: Buffer) -> None:
        await asyncio.to_thread(self.set_sync, key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self.exists(key):
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.delete_sync, key)

    async def list(self) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, ""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._dir, prefix.rstrip("/")):
            yield key

    # -- reading ------------------------------------------------------------------------
    def get_sync(
        self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        path = _metadata_path(key)
        if path is not None:
            doc = self._metadata(path)
            return None if doc is None else prototype.buffer.from_bytes(_byte_range(doc, byte_range))
        found = self._chunk_of(key, self._readable)
        if found is None:
            return None
        data = self._chunk_bytes(*found)
        return None if data is None else prototype.buffer.from_array_like(_byte_range(data, byte_range))

    def exists_sync(self, key: str) -> bool:
        path = _metadata_path(key)
        if path is not None:
            return self._dataset(path) is not None or self._group_names(path) is not None
        found = self._chunk_of(key, self._dataset)
        return found is not None and found[0].sealed and bool(found[0]._written[ravel(found[1], found[0]._grid)])

    def _metadata(self, path: str) -> bytes | None:
        ds = self._dataset(path)
        if ds is not None:
            return md.document(md.array_metadata(ds.name, md.spec_of(ds)))
        names = self._group_names(path)
        if names is None:
            return None
        members: dict[str, Any] = {}
        for rel in names:
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                members.setdefault("/".join(parts[:depth]), md.group_metadata({}))
            ds = self._dataset(f"{path}/{rel}" if path else rel)
            try:
                if ds is not None and ds.sealed:
                    members[rel] = md.array_metadata(ds.name, md.spec_of(ds))
            except FabricError:
                continue  # a type zarr has no data type for: not a member zarr can open
        return md.document(md.group_metadata(members))

    def _group_names(self, path: str) -> list[str] | None:
        """Sealed dataset names under the group at ``path``, relative to it (None: no such group)."""
        group = self.prefix + path + "/" if path else self.prefix
        names = [n[len(group) :] for n in self.fabric.datasets(group)]
        return names if names or not path else None

    def _readable(self, path: str) -> Dataset | None:
        ds = self._dataset(path)
        if ds is not None and not ds.sealed:
            raise DatasetWritingError(
                f"dataset {ds.name!r} is still being written: a chunk is read once it is sealed (store.close()); "
                "zarr reads a chunk before it writes part of one, so write whole chunks (chunk-aligned selections)"
            )
        return ds

    def _chunk_bytes(self, ds: Dataset, index: tuple[int, ...]) -> np.ndarray | None:
        if not ds._written[ravel(index, ds._grid)]:
            return None
        try:
            view = ds.chunk(index)
        except NameNotFoundError:  # deleted (and maybe made again) since this handle was cached
            self._sealed.pop(ds.name, None)
            raise
        if view.shape != ds.chunks:
            padded = np.broadcast_to(ds._fill, ds.chunks).copy()
            padded[tuple(slice(0, n) for n in view.shape)] = view
            view = padded
        return np.asarray(view).reshape(-1).view(np.uint8)  # a view of the view: it holds the lease

    # -- writing ------------------------------------------------------------------------
    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_writable()
        path = _metadata_path(key)
        if path is not None:
            self._set_metadata(path, value.to_bytes())
            return
        ds, index = self._writable_chunk(key)
        data = value.as_numpy_array()
        if data.nbytes != int(np.prod(ds.chunks)) * ds.dtype.itemsize:
            raise InvalidArgumentError(
                f"zarr key {key!r}: {data.nbytes} bytes for a chunk of shape {ds.chunks} and {ds.dtype}"
            )
        self._write_chunk(key, ds, index, data.view(ds.dtype).reshape(ds.chunks))

    def delete_sync(self, key: str) -> None:
        """A chunk: zarr's way of writing one whose values are all the fill value."""
        self._check_writable()
        if _metadata_path(key) is not None:
            raise InvalidArgumentError(
                f"zarr key {key!r}: a fabric dataset is write-once and is not deleted through zarr "
                "(nor overwritten: no overwrite=True); fabric.delete(name) deletes it"
            )
        ds, index = self._writable_chunk(key)
        self._write_chunk(key, ds, index, np.broadcast_to(ds._fill, ds.chunks))

    def _set_metadata(self, path: str, doc: bytes) -> None:
        kind = md.node_type(doc)
        if kind == "group" or not path:
            md.parse_group(doc)  # checked, and otherwise generated: a group is its datasets' names
            return
        spec = md.parse_array(doc)
        name = self.prefix + path
        ds = self._dataset(path)
        if ds is not None:
            served = md.parse_array(md.document(md.array_metadata(ds.name, md.spec_of(ds))))  # as zarr sees it
            change = md.describe_change(served, spec)
            if change is not None:
                raise InvalidArgumentError(
                    f"zarr metadata for dataset {name!r} would change {change}; a fabric dataset keeps what it "
                    "was created with: create another under a new name"
                )
            return
        fill = np.frombuffer(spec.fill, spec.dtype).reshape(())[()]
        ds = self.fabric.create_dataset(
            name, spec.shape, spec.dtype, chunks=spec.chunks, fillvalue=fill, attrs=spec.attrs
        )
        self._created[name] = self._writing[name] = ds

    def _writable_chunk(self, key: str) -> tuple[Dataset, tuple[int, ...]]:
        found = self._chunk_of(key, self._dataset)
        if found is None:
            raise InvalidArgumentError(
                f"zarr key {key!r} is not a chunk of a dataset under {self.prefix!r}: create the array first"
            )
        if found[0].sealed:
            raise DatasetSealedError(
                f"zarr key {key!r}: dataset {found[0].name!r} is sealed, and read-only: zarr neither overwrites "
                "nor deletes it (no overwrite=True); fabric.delete(name) deletes it"
            )
        return found

    def _write_chunk(self, key: str, ds: Dataset, index: tuple[int, ...], chunk: np.ndarray) -> None:
        clipped = chunk_shape(index, ds.shape, ds.chunks)
        region = tuple(slice(k * c, k * c + n) for k, c, n in zip(index, ds.chunks, clipped, strict=True))
        try:
            writes.write(ds, Selection(region, ds.shape), chunk[tuple(slice(0, n) for n in clipped)], once=True)
        except ChunkWrittenError:
            raise ChunkWrittenError(
                f"zarr key {key!r}: chunk {index} of dataset {ds.name!r} was written already, and nothing was "
                "changed; through zarr a chunk is written once: write each chunk whole, by one writer"
            ) from None

    # -- names and keys -------------------------------------------------------------------
    def _dataset(self, path: str) -> Dataset | None:
        """The dataset at ``path``: a sealed one from the cache, else asked for (None: none)."""
        if not path:
            return None
        name = self.prefix + path
        ds = self._sealed.get(name)
        if ds is None:
            ds = self._writing.get(name)
        if ds is not None and ds.sealed:
            return ds
        try:
            ds = self.fabric.dataset(name)
        except (NameNotFoundError, InvalidNameError):
            self._writing.pop(name, None)
            return None
        if ds.sealed:
            self._sealed[name] = ds
            self._writing.pop(name, None)
        return ds

    def _chunk_of(self, key: str, lookup: Any) -> tuple[Dataset, tuple[int, ...]] | None:
        """The dataset and grid index a chunk key names: ``<path>/c/i/j``, the rightmost
        ``c`` followed by as many indices as the dataset has dimensions."""
        parts = key.split("/")
        for at in range(len(parts) - 1, 0, -1):
            tail = parts[at + 1 :]
            if parts[at] != "c" or not all(t.isascii() and t.isdigit() for t in tail):
                continue
            ds = lookup("/".join(parts[:at]))
            if ds is not None and ds.ndim == len(tail):
                index = tuple(int(t) for t in tail)
                if all(k < g for k, g in zip(index, ds._grid, strict=True)):
                    return ds, index
        return None

    def _keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``: the metadata documents, and the written chunks of
        sealed datasets."""
        keys = {METADATA}
        for rel in self._group_names("") or []:
            parts = rel.split("/")
            keys.update("/".join([*parts[:depth], METADATA]) for depth in range(1, len(parts)))
            ds = self._dataset(rel)
            if ds is None or not ds.sealed:
                continue
            keys.add(f"{rel}/{METADATA}")
            for index in itertools.product(*map(range, ds._grid)):
                if ds._written[ravel(index, ds._grid)]:
                    keys.add("/".join([rel, "c", *map(str, index)]))
        return sorted(k for k in keys if k.startswith(prefix))

    def _dir(self, path: str) -> list[str]:
        ds = self._dataset(path)
        if ds is not None:
            return [METADATA, "c"] if ds.sealed and ds._written.any() else [METADATA]
        names = self._group_names(path)
        if names is None:
            return []
        return [METADATA, *sorted({rel.split("/", 1)[0] for rel in names})]


def _store(fabric: Any, prefix: str, read_only: bool) -> FabricStore:
    return FabricStore(fabric, prefix, read_only=read_only)


def _metadata_path(key: str) -> str | None:
    """The node path of a metadata key ("" for the root), None for any other key."""
    if key == METADATA:
        return ""
    if key.endswith("/" + METADATA):
        return key[: -len(METADATA) - 1]
    return None


def _byte_range(data: Any, byte_range: ByteRequest | None) -> Any:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix) :]
    raise InvalidArgumentError(f"byte range {byte_range!r} is not one zarr defines")
