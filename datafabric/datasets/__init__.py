"""Chunked n-d datasets on write-once variables: h5py-style slicing, dask.array in and out.

grid.py       the chunk grid: shapes, default chunks, chunk types and indices
selection.py  numpy-style selections split over the chunks they touch
dataset.py    the ``Dataset`` handle: reads, writes, seal
writes.py     the write protocol's client side: tickets, local and remote writes
dask.py       ``to_dask`` and ``from_dask``
methods.py    the ``Fabric`` methods (a mixin) and h5py's File habits
"""

from datafabric.datasets.dataset import Dataset

__all__ = ["Dataset"]
