"""What the HTTP API lists, describes and reads: the one place that knows what an entry is.

``page`` lists variables and sealed datasets (one entry each, kind ``dataset``), never
the chunk variables that hold a dataset's chunks, as ``fabric.get_list`` does.
``describe`` and ``opened`` serve variables only so far: a dataset's chunks plug in there.
The routes and the web page call only these functions.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from datafabric.datasets.grid import chunk_type
from datafabric.errors import InvalidArgumentError
from datafabric.messages import VariableInfo
from datafabric.names import validate_name
from datafabric.types import FabricType, from_datashape, from_dtype, parse_type
from yp.http.slices import Selection, parse_slice, select

if TYPE_CHECKING:
    from yp.plugin import YellowPages

MAX_PAGE = 10_000
DEFAULT_PAGE = 1_000
PIECE = 8 * 2**20  # bytes a response reads at a time


def summary(yp: YellowPages, name: str) -> dict[str, Any]:
    """One line of the listing: no owner is asked anything."""
    d = yp.directory
    record = d.datasets.get(name)
    if record is not None:  # a sealed dataset (the listing has no other): one entry for its chunks
        itemsize = from_datashape(record.element).dtype.itemsize
        return {
            "name": name,
            "kind": "dataset",
            "doc": record.doc,
            "type": chunk_type(record.element, record.shape),
            "nbytes": math.prod(record.shape) * itemsize,
            "nodes": sorted({n for v in _chunk_variables(d, record) for n in d.nodes_of(v)}),
        }
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
    """Names from ``prefix`` sorted, those after ``after``; ``next`` continues the listing."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgumentError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    names = yp.datasets.names(prefix)  # chunk variables hidden, each sealed dataset one entry
    start = bisect.bisect_right(names, after) if after is not None else 0
    chosen = names[start : start + limit]
    more = start + limit < len(names)
    return {
        "entries": [summary(yp, n) for n in chosen],
        "total": len(names),
        "next": chosen[-1] if more and chosen else None,
    }


def _chunk_variables(d: Any, record: Any) -> list[Any]:
    found = (d.by_id.get(i) for i in record.table[record.table >= 0].tolist())
    return [v for v in found if v is not None]


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


def checked_name(name: str) -> str:
    return validate_name(name)
