"""What the HTTP API lists, describes and reads: the one place that knows what an entry is.

An entry is a variable or a sealed dataset (chunked, many hidden chunk variables under
one name).  ``page`` lists one entry per dataset, never its chunks; ``describe`` and
``describe_dataset`` say where the bytes are; ``opened`` and ``opened_dataset`` turn a
``slice=`` into what to read.  The routes and the web page call only these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from datafabric.datasets.grid import chunk_count, chunk_type, grid_shape, unravel
from datafabric.errors import InvalidArgumentError, NameNotFoundError
from datafabric.messages import VariableInfo
from datafabric.names import is_chunk_name, validate_name
from datafabric.types import FabricType, from_datashape, from_dtype, parse_type
from yp.dataset_table import DatasetRecord
from yp.http.dataset_reads import DatasetSelection, select_dataset
from yp.http.slices import Selection, parse_slice, select

if TYPE_CHECKING:
    from yp.plugin import YellowPages

MAX_PAGE = 10_000
DEFAULT_PAGE = 1_000
PIECE = 8 * 2**20  # bytes a response reads at a time


def summary(yp: YellowPages, name: str) -> dict[str, Any]:
    """One line of the listing: no owner is asked anything, no chunk is looked at."""
    d = yp.directory
    record = d.datasets.get(name)
    if record is not None:
        return {"name": name, "kind": "dataset", "doc": record.doc} | _dataset_fields(record)
    var = d.lookup(name)
    return {
        "name": var.name,
        "kind": "variable",
        "doc": var.doc,
        "type": var.type,
        "nbytes": var.nbytes,
        "nodes": sorted(d.nodes_of(var)),
    }


def page(yp: YellowPages, prefix: str, after: str | None, limit: int) -> dict[str, Any]:
    """Names from ``prefix`` sorted, those after ``after``; ``next`` continues the listing.
    One more name than the page is asked for, to know whether there is more; ``total``
    is counted by bisection of the sorted index, never by a scan of the names."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgumentError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    names = yp.datasets.names(prefix, limit + 1, after)
    chosen = names[:limit]
    return {
        "entries": [summary(yp, n) for n in chosen],
        "total": yp.datasets.count(prefix),
        "next": chosen[-1] if len(names) > limit else None,
    }


def _dataset_fields(record: DatasetRecord) -> dict[str, Any]:
    dtype = from_datashape(record.element).dtype
    return {
        "type": chunk_type(record.element, record.shape),
        "shape": list(record.shape),
        "dtype": dtype_text(dtype),
        "chunks": list(record.chunks),
        "nbytes": math.prod(record.shape) * dtype.itemsize,
    }


def sealed_dataset(yp: YellowPages, name: str) -> DatasetRecord | None:
    """The sealed dataset named ``name``; None if the name is not a dataset's.  A dataset
    still being written is refused (``DatasetWritingError``): it is read once sealed."""
    if name not in yp.directory.datasets:
        return None
    return yp.datasets.table.readable(name)


def describe_dataset(yp: YellowPages, record: DatasetRecord) -> dict[str, Any]:
    """A dataset's entry with its chunk grid, which chunks are written and where each
    written chunk lives: one directory look-up per written chunk, no owner asked."""
    d = yp.directory
    grid = grid_shape(record.shape, record.chunks)
    written = []
    for flat in np.flatnonzero(record.table >= 0).tolist():
        nodes = sorted(d.nodes_of_chunk(var_id=int(record.table[flat])))  # none materialised
        written.append({"flat": flat, "index": list(unravel(flat, grid)), "nodes": nodes})
    return {
        "name": record.name,
        "kind": "dataset",
        "doc": record.doc,
        **_dataset_fields(record),
        "attrs": record.attrs,
        "grid": list(grid),
        "nchunks": chunk_count(record.shape, record.chunks),
        "fillvalue": _jsonable_scalar(np.frombuffer(record.fillvalue, from_datashape(record.element).dtype)[0]),
        "written": written,
        "locations": [],
    }


def _jsonable_scalar(value: np.generic) -> Any:
    item = value.item()
    return item if isinstance(item, bool | int | float | str) and item == item else str(item)


def type_of(var_type: str) -> FabricType:
    return parse_type(var_type)


def describe(info: VariableInfo) -> dict[str, Any]:
    ftype = type_of(info["type"])
    return {
        "name": info["name"],
        "kind": "variable",
        "doc": info["doc"],
        "type": info["type"],
        "shape": list(ftype.shape),
        "dtype": dtype_text(ftype.dtype),
        "nbytes": info["nbytes"],
        "chunks": None,  # a variable is one piece of memory; a dataset lists its chunks here
        "locations": [
            {"node": n, "shm_id": s, "data_offset": o, "worker": w}
            for (n, s, o), w in zip(info["locations"], info["workers"], strict=True)
        ],
    }


def dtype_text(dtype: np.dtype) -> str:
    """numpy's spelling: ``<f8``, or the list of fields of a record."""
    return dtype.str if dtype.fields is None else str(dtype.descr)


@dataclass(frozen=True)
class Opened:
    """A selection of an entry, ready to read: the answer's type and its pieces."""

    ftype: FabricType  # of the answer
    selection: Selection


def opened(info: VariableInfo, slice_text: str | None) -> Opened:
    ftype = type_of(info["type"])
    index = parse_slice(slice_text, len(ftype.shape))
    selection = select(ftype.shape, ftype.dtype, index, PIECE)
    return Opened(from_dtype(ftype.dtype, selection.shape), selection)


def opened_dataset(record: DatasetRecord, slice_text: str | None) -> DatasetSelection:
    index = parse_slice(slice_text, len(record.shape))
    return select_dataset(record, index, PIECE)


def checked_name(name: str) -> str:
    """A valid name that is not a dataset's hidden chunk: those are read through their dataset."""
    validate_name(name)
    if is_chunk_name(name):
        raise NameNotFoundError(f"no entry named {name!r}: a dataset's chunks are read through the dataset")
    return name
