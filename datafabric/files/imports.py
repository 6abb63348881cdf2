"""An HDF5 dataset, a zarr array or a .npy file imported as a sealed fabric dataset.

The import is a dataset like any other (``docs/protocols.md``, Datasets): created, written
chunk by chunk, then sealed, so nothing is visible before the last chunk is in, and a
failure at any point (a read error, no room, Ctrl-C) aborts it, which frees every chunk
written so far.  Each chunk is read by the file's library straight into the chunk's
shared memory (``fill_chunk``): one copy, and at most one chunk's bytes in flight, so a
file larger than this process's memory imports in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from datafabric.datasets.dataset import Dataset
from datafabric.datasets.grid import grid_shape
from datafabric.datasets.writes import fill_chunk
from datafabric.files.sources import Source, open_source


def import_file(
    fabric: Any,
    name: str,
    spec: str,
    chunks: Any = None,
    doc: str = "",
    advance: Callable[[int], None] | None = None,
) -> tuple[Dataset, list[str]]:
    """Import the array ``spec`` names (``a.h5:/group/ds``, ``a.h5``, ``dir.zarr``,
    ``a.npy``) as the sealed dataset ``name``; returns it and the attributes dropped."""
    with ExitStack() as stack:
        source = open_source(spec, stack)
        return import_source(fabric, name, source, chunks, doc, advance), source.dropped


def import_source(
    fabric: Any,
    name: str,
    source: Source,
    chunks: Any = None,
    doc: str = "",
    advance: Callable[[int], None] | None = None,
) -> Dataset:
    """``source`` as the sealed dataset ``name``.  ``chunks``: the dataset's chunk shape
    (an int, a tuple or "auto"); None takes the file's own chunks, or "auto" when it has
    none.  ``advance(nbytes)`` is called after each chunk."""
    ds = fabric.create_dataset(
        name,
        source.shape,
        source.dtype,
        chunks=source.chunks if chunks is None else chunks,
        fillvalue=np.asarray(source.fillvalue, dtype=source.dtype),
        doc=doc,
        attrs=source.attrs,
    )
    with ds:  # sealed at the end of the block, aborted on any exception
        copy_chunks(ds, source, advance)
    return ds


def copy_chunks(ds: Dataset, source: Source, advance: Callable[[int], None] | None = None) -> None:
    """Every chunk of ``ds`` read from ``source``, in C order of the chunk grid."""
    for index in np.ndindex(*grid_shape(ds.shape, ds.chunks)):
        box = tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(index, ds.chunks, ds.shape, strict=True))
        fill_chunk(ds, index, lambda view, box=box: source.read(view, box))
        if advance is not None:
            advance(int(np.prod([b.stop - b.start for b in box], dtype=np.int64)) * ds.dtype.itemsize)
