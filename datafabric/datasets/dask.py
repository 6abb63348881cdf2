"""dask.array in and out of datasets.

``to_dask``: one task per chunk, calling the dataset's ``ChunkReader`` with the chunk
variable's name (``chunk_reader.py``), which the YellowPages recognises in every graph entering the scheduler, fused or not, and
restricts to the workers of a node holding that chunk (``yp/locality.py``): locality
that graph optimisation cannot drop, as it drops annotations (dask/dask#7036).  The
reads are a Blockwise layer, as ``da.from_array``'s are, so blockwise fusion folds each
read into the task that consumes its chunk under that task's own key: a low-level
(linear) fusion of a plain layer would leave an extra ``Alias`` task per chunk, which
the scheduler and the workers pay for (a third more tasks in ``ds.to_dask().sum()``).

``from_dask``: the array is stored with ``da.store`` into a new dataset with its chunk
shape, so each chunk is written by the task that computed it, into a home on that
worker's node; then sealed.  Irregular chunks are rechunked to the largest first.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.blockwise import BlockwiseDepDict, blockwise
from dask.highlevelgraph import HighLevelGraph

from datafabric.datasets.chunk_reader import ChunkReader
from datafabric.datasets.dataset import Dataset
from datafabric.datasets.grid import ravel
from datafabric.names import chunk_name


def to_dask(ds: Dataset) -> da.Array:
    ds._check_readable()
    key = f"datafabric-{ds.id}-{tokenize(ds.name, ds.id)}"
    # A dimension of length 0 has no chunk in the dataset's grid, and one empty block in dask's.
    chunks = tuple(
        tuple(min(c, n - k * c) for k in range(g)) or (0,)
        for n, c, g in zip(ds.shape, ds.chunks, ds._grid, strict=True)
    )
    blocks = tuple(len(c) for c in chunks)
    written = blocks == ds._grid  # else an empty dimension: one empty block in dask's grid, never written
    what = BlockwiseDepDict(
        {
            index: chunk_name(ds.id, flat)
            if written and ds._written[flat := ravel(index, ds._grid)]
            else tuple(c[i] for c, i in zip(chunks, index, strict=True))
            for index in np.ndindex(*blocks)
        },
        numblocks=blocks,
    )
    out = tuple(range(ds.ndim))
    reader = ChunkReader(ds._fabric, ds._info["element"], ds._info["fillvalue"])
    layer = blockwise(reader, key, out, what, out, numblocks={}, _data_producer=True)
    return da.Array(HighLevelGraph.from_collections(key, layer, dependencies=()), key, chunks, dtype=ds.dtype)


def from_dask(fabric: Any, name: str, array: Any, doc: str, attrs: dict | None) -> Dataset:
    array = da.asarray(array)
    chunksize = tuple(max(c) if c else 1 for c in array.chunks)
    regular = all(
        all(x == c for x in dims[:-1]) and dims[-1] <= c for dims, c in zip(array.chunks, chunksize, strict=True)
    )
    if not regular:
        array = array.rechunk(chunksize)
    ds = fabric.create_dataset(name, array.shape, array.dtype, chunks=chunksize, doc=doc, attrs=attrs)
    client = fabric._client or _client(fabric)
    try:
        client.compute(da.store(array, ds, lock=False, compute=False)).result()
    except BaseException:
        ds.abort()
        raise
    return ds.seal()


def _client(fabric: Any) -> Any:
    import distributed

    return distributed.get_client(fabric.address)
