"""A dataset or a variable exported to an HDF5, zarr or .npy file, piece by piece.

A dataset is written chunk by chunk, each from its zero-copy view; an HDF5 or zarr file
gets the dataset's chunk shape, fill value and attributes, and only the chunks that were
written (the others read as the fill value there too).  A variable is written in slabs
of whole rows of at most ``SLAB`` bytes.

Nothing half-written is ever visible under the output's name: the file (or the zarr
directory) is written under a hidden temporary name in the same directory and renamed
to the output at the end, and removed on any failure.  An existing output is refused
unless ``force``; with it, the old one is replaced only once the new one is complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datafabric.datasets.dataset import Dataset
from datafabric.datasets.grid import chunk_shape, grid_shape, ravel
from datafabric.errors import InvalidArgumentError, InvalidTypeError, NameNotFoundError, OutputExistsError
from datafabric.files.sources import DOC_ATTR, H5_SUFFIXES, optional_module, split_inner

SLAB = 8 * 2**20  # bytes of a variable written at a time
Piece = tuple[tuple[slice, ...], np.ndarray]


@dataclass
class Exported:
    """What an export writes: its array's layout and its pieces, ``(box, values)``;
    ``pieces(every=False)`` leaves out a dataset's chunks never written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None  # a dataset's; None for a variable
    fillvalue: Any
    attrs: dict
    pieces: Callable[[bool], Iterator[Piece]]
    view: np.ndarray | None = None  # a variable's zero-copy view
    dataset: Dataset | None = None
    doc: str = ""

    def file_attrs(self) -> dict:
        """The attributes an HDF5 or zarr output gets: the attrs, and a non-empty doc as
        ``datafabric:doc`` (an import makes it the doc again)."""
        return self.attrs | {DOC_ATTR: self.doc} if self.doc else dict(self.attrs)

    def rows(self) -> Iterator[np.ndarray]:
        """The array in C order, in slabs of whole rows (a dataset's one chunk high)."""
        if self.view is not None:
            yield from (part for _, part in _slabs(self.view))
            return
        ds = self.dataset
        assert ds is not None  # one of view and dataset is set
        step = ds.chunks[0] if ds.shape else 1
        for start in range(0, ds.shape[0] if ds.shape else 1, step):
            yield np.ascontiguousarray(ds[start : start + step] if ds.shape else ds[()])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def exported(fabric: Any, name: str) -> Exported:
    """The dataset ``name``, else the variable ``name`` (``NameNotFoundError`` if neither)."""
    try:
        ds = fabric.dataset(name)
    except NameNotFoundError:
        view = fabric.get(name)
        doc = fabric.info(name)["doc"]
        return Exported(name, view.shape, view.dtype, None, 0, {}, lambda every: _slabs(view), view=view, doc=doc)
    grid = grid_shape(ds.shape, ds.chunks)

    def pieces(every: bool) -> Iterator[Piece]:
        for index in np.ndindex(*grid):
            if every or ds.chunk_name(ravel(index, grid)) is not None:
                shape = chunk_shape(index, ds.shape, ds.chunks)
                box = tuple(slice(k * c, k * c + n) for k, c, n in zip(index, ds.chunks, shape, strict=True))
                yield box, ds.chunk(index)

    return Exported(name, ds.shape, ds.dtype, ds.chunks, ds.fillvalue, dict(ds.attrs), pieces, dataset=ds, doc=ds.doc)


def slab_rows(shape: tuple[int, ...], itemsize: int) -> int:
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    return max(1, SLAB // max(row, 1))


def _slabs(view: np.ndarray) -> Iterator[Piece]:
    if view.ndim == 0:
        yield (), view
        return
    rows = slab_rows(view.shape, view.dtype.itemsize)
    for start in range(0, view.shape[0], rows):
        stop = min(start + rows, view.shape[0])
        yield (slice(start, stop), *(slice(0, n) for n in view.shape[1:])), view[start:stop]


def export_kind(output: str) -> str | None:
    """ "h5", "zarr" or "npy" for an output an export writes with its library; None for
    a raw file."""
    suffix = split_inner(output)[0].suffix.lower()
    return "h5" if suffix in H5_SUFFIXES else {".zarr": "zarr", ".npy": "npy"}.get(suffix)


def export_file(array: Exported, output: str, force: bool = False, advance: Callable[[int], None] | None = None) -> str:
    """Write ``array`` to ``output`` (``out.h5``, ``out.h5:/group/ds``, ``out.zarr``,
    ``out.npy``); returns what was written, e.g. ``out.h5:/run1/grid``."""
    path, inner = split_inner(output)
    kind = export_kind(output)
    step = advance or (lambda nbytes: None)
    with replacing(path, force) as tmp:
        if kind == "h5":
            inner = inner or "/" + array.name
            _write_h5(array, tmp, inner, step, path)
            return f"{path}:{inner}"
        if kind == "zarr":
            return f"{path} (zarr v{_write_zarr(array, tmp, step)})"
        if kind == "npy":
            _write_npy(array, tmp, step)
            return str(path)
        raise InvalidArgumentError(f"{output}: exports write .h5, .hdf5, .zarr or .npy files")


def _write_h5(array: Exported, tmp: Path, inner: str, advance: Callable[[int], None], path: Path) -> None:
    h5py = optional_module("h5py", "h5py")
    with h5py.File(tmp, "w") as f:
        try:
            fill = np.asarray(array.fillvalue, array.dtype)[()]
            dset = f.create_dataset(inner, array.shape, array.dtype, chunks=array.chunks, fillvalue=fill)
        except TypeError as exc:
            raise InvalidTypeError(
                f"HDF5 cannot hold the dtype {array.dtype} of {array.name!r} ({exc}): export it to a .npy or .zarr file"
            ) from None
        except ValueError as exc:
            raise InvalidArgumentError(f"cannot create {inner} in {path}: {exc}") from None
        for key, value in array.file_attrs().items():
            if value is not None:  # HDF5 has no null attribute
                dset.attrs[key] = value
        for box, part in array.pieces(array.chunks is None):
            if part.flags.c_contiguous:
                dset.write_direct(part, dest_sel=box if box else np.s_[()])
            else:  # a chunk never written: its fill value, broadcast
                dset[box] = part
            advance(part.nbytes)


def _write_zarr(array: Exported, tmp: Path, advance: Callable[[int], None]) -> int:
    """zarr v3, or v2 for what v3 would change: structured or big-endian dtypes (v3 keeps
    neither the byte order nor a record's field layout)."""
    zarr = optional_module("zarr", "zarr")
    native = array.dtype.fields is None and array.dtype.byteorder != (">" if sys.byteorder == "little" else "<")
    zarr_format = 3 if native else 2
    chunks = array.chunks or ((slab_rows(array.shape, array.dtype.itemsize), *array.shape[1:]) if array.shape else ())
    z = zarr.create_array(
        str(tmp),
        shape=array.shape,
        chunks=tuple(max(1, c) for c in chunks),
        dtype=array.dtype,
        fill_value=np.asarray(array.fillvalue, array.dtype)[()],
        attributes=array.file_attrs(),
        zarr_format=zarr_format,
    )
    if z.dtype != array.dtype:
        raise InvalidTypeError(
            f"zarr cannot keep the dtype {array.dtype} of {array.name!r} (it would read back as {z.dtype}): "
            "export it to a .h5 or .npy file"
        )
    for box, part in array.pieces(array.chunks is None):
        z[box] = part
        advance(part.nbytes)
    return zarr_format


def _write_npy(array: Exported, tmp: Path, advance: Callable[[int], None]) -> None:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
    try:
        for box, part in array.pieces(True):
            out[box] = part
            advance(part.nbytes)
        out.flush()
    finally:
        del out


# -- the output, written under a temporary name --------------------------------------------


def check_output(path: Path, force: bool) -> None:
    """Refuse an output that exists (unless ``force``) or whose directory does not."""
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path} exists already: pass --force to replace it")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: there is no directory {path.parent}")


@contextmanager
def replacing(path: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it to ``path`` if the block
    succeeds, remove it if not."""
    check_output(path, force)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    try:
        yield tmp
        check_output(path, force)  # it may have appeared meanwhile
        _publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _publish(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        aside = tmp.with_name(tmp.name + ".old")
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside)
    elif tmp.is_dir() and os.path.lexists(path):
        os.unlink(path)
        os.rename(tmp, path)
    else:
        os.replace(tmp, path)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        tmp.unlink()
