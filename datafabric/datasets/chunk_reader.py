"""What each task of ``to_dask`` calls: its chunk's zero-copy view, or the fill value.

One ``ChunkReader`` per dataset holds what all its chunks share (the fabric, the element
type, the fill value), so a task's only argument of its own is its chunk: the chunk
variable's name when written, the chunk's shape when never written.  Dask substitutes each
per-block argument into each task as it builds the graph, one new task object per argument:
with five of them, ``ds.to_dask().sum()`` of 128 chunks took 7.2 ms of the client's
optimisation, with one 3.8 ms (a persisted array's sum: 5.7 ms).  The YellowPages finds these
calls in every graph entering the scheduler (``yp/locality.py``), fused or not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datafabric.types import from_datashape


class ChunkReader:
    __slots__ = ("fabric", "element", "fillvalue")

    def __init__(self, fabric: Any, element: str, fillvalue: bytes) -> None:
        self.fabric = fabric
        self.element = element
        self.fillvalue = fillvalue

    def __call__(self, chunk: str | tuple[int, ...]) -> np.ndarray:
        """``chunk``: a chunk variable's name (its view), or a never-written chunk's shape
        (the fill value broadcast to it: no memory)."""
        if isinstance(chunk, str):
            return self.fabric.get(chunk)
        fill = np.frombuffer(self.fillvalue, from_datashape(self.element).dtype).reshape(())
        return np.broadcast_to(fill, chunk)

    def __reduce__(self) -> tuple:
        return (ChunkReader, (self.fabric, self.element, self.fillvalue))

    def __dask_tokenize__(self) -> tuple:
        return ("datafabric-chunk-reader", self.fabric.address, self.fabric.fabric_id, self.element, self.fillvalue)

    def __repr__(self) -> str:
        return f"ChunkReader({self.fabric!r}, {self.element!r})"
