"""zarr v3 over the fabric: ``FabricStore(fabric, prefix="")`` is a zarr ``Store`` whose
arrays are the fabric's datasets, for ``zarr.open_array``, ``dask.array.from_zarr``,
``xarray.open_zarr`` and ``zarr.create_array`` (uncompressed, chunk-aligned writes).

store.py     the ``Store``: keys to datasets and chunks, reads, write-once writes, seal
metadata.py  a dataset as zarr v3 metadata, and zarr v3 metadata as a dataset to create

zarr is an optional extra: ``pip install datafabric[zarr]``.
"""

from datafabric.zarr.store import FabricStore

__all__ = ["FabricStore"]
