"""An HDF5 dataset, a zarr array or a .npy file imported as a sealed fabric dataset.

The import is a dataset like any other (``docs/protocols.md``, Datasets): created, written
chunk by chunk, then sealed, so nothing is visible before the last chunk is in, and a
failure at any point (a read error, no room, Ctrl-C) aborts it, which frees every chunk
written so far.  Each chunk is read by the file's library straight into the chunk's
shared memory (``fill_chunks``): one copy, and at most one chunk's bytes in flight, so a
file larger than this process's memory imports in bounded memory.  One write ticket
covers a batch of chunks (``BATCH_BYTES``), not one each: two round trips per batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from datafabric.datasets.dataset import Dataset
from datafabric.datasets.grid import grid_shape
from datafabric.datasets.writes import fill_chunks
from datafabric.files.sources import DOC_ATTR, Source, open_source

BATCH_BYTES = 128 * 2**20  # chunks' homes a ticket reserves ahead of the copy, at most
MAX_BATCH = 1024  # chunks a ticket names, at most (small chunks)


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
    none.  ``doc``: the dataset's, else the file's ``datafabric:doc`` attribute (what an
    export writes), which is not kept among its attrs.  ``advance(nbytes)`` is called
    after each chunk."""
    exported_doc = source.attrs.pop(DOC_ATTR, "")
    doc = doc or (exported_doc if isinstance(exported_doc, str) else "")
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
    """Every chunk of ``ds`` read from ``source``, in C order of the chunk grid, a batch
    of chunks per write ticket."""

    def read(view: np.ndarray, index: tuple[int, ...]) -> None:
        box = tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(index, ds.chunks, ds.shape, strict=True))
        source.read(view, box)
        if advance is not None:
            advance(view.nbytes)

    per_batch = max(1, min(MAX_BATCH, BATCH_BYTES // max(1, int(np.prod(ds.chunks)) * ds.dtype.itemsize)))
    indices = np.ndindex(*grid_shape(ds.shape, ds.chunks))
    while batch := list(itertools.islice(indices, per_batch)):
        fill_chunks(ds, batch, read)
