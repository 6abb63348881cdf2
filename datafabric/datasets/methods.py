"""The ``Fabric``'s dataset methods, and h5py's ``File``/``Group`` habits on the fabric
itself (``fabric["name"]``, ``in``, ``len``, iteration, ``del``): a mixin, so that
``fabric.py`` stays one module with one job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from datafabric import arguments
from datafabric.datasets.dataset import Dataset
from datafabric.datasets.grid import normalize_chunks, normalize_shape
from datafabric.errors import InvalidArgumentError, InvalidTypeError, NameNotFoundError
from datafabric.names import validate_name, validate_new_name
from datafabric.types import from_dtype


class DatasetMethods:
    def create_dataset(
        self,
        name: str,
        shape: Any = None,
        dtype: Any = None,
        data: Any = None,
        chunks: Any = None,
        fillvalue: Any = 0,
        doc: str = "",
        attrs: dict | None = None,
    ) -> Dataset:
        """h5py's ``create_dataset``: shape and dtype from ``data`` when given (then the
        dataset is written and sealed before it is returned); otherwise a dataset to
        write with ``ds[sel] = values`` until ``ds.seal()`` or the end of
        ``with fabric.create_dataset(...) as ds:``.  ``chunks``: an int, a tuple, or
        None / "auto" for about 16 MiB each."""
        validate_new_name(name)
        arguments.doc(doc)
        if data is not None:
            data = np.asarray(data, dtype=dtype)
            shape = data.shape if shape is None else shape
        shape = normalize_shape(shape)
        if data is not None and data.shape != shape:
            raise InvalidArgumentError(f"shape {shape} differs from data's shape {data.shape}")
        dtype = np.dtype(np.float64 if dtype is None and data is None else (data.dtype if data is not None else dtype))
        element = from_dtype(dtype, ())
        if element.shape:
            raise InvalidTypeError(f"dtype {dtype} has a subarray shape; give its dimensions to the dataset's shape")
        fill = arguments.fill_value(0 if fillvalue is None else fillvalue, element.dtype)
        fill_bytes = bytes(element.dtype.itemsize) if fill.dtype != element.dtype else fill.tobytes()
        attrs = _attrs(attrs)
        ctx = self._ctx()
        info = ctx.call(
            "dataset_create",
            name=name,
            shape=list(shape),
            element=element.datashape,
            chunks=list(normalize_chunks(chunks, shape, element.dtype.itemsize)),
            fillvalue=fill_bytes,
            doc=doc,
            attrs=attrs,
            holder=ctx.holder,
        )
        ds = Dataset(self, info)
        if data is not None:
            with ds:
                ds[...] = data
        return ds

    def dataset(self, name: str) -> Dataset:
        """Open a dataset: to read once sealed, to write until then (in tasks too)."""
        return Dataset(self, self._ctx().call("dataset_open", name=validate_name(name)))

    def datasets(self, prefix: str = "") -> list[str]:
        """Names of the sealed datasets starting with ``prefix``, sorted."""
        return list(self._ctx().call("dataset_list", prefix=arguments.text(prefix, "prefix")))

    def from_dask(self, name: str, array: Any, doc: str = "", attrs: dict | None = None) -> Dataset:
        """Compute a dask array straight into a sealed dataset with its chunks: each
        chunk is stored by the worker that computed it."""
        from datafabric.datasets.dask import from_dask

        return from_dask(self, name, array, doc, attrs)

    # -- h5py's File habits ----------------------------------------------------------------
    def __getitem__(self, name: str) -> Dataset | np.ndarray:
        """A dataset, or a variable's zero-copy view."""
        try:
            return self.dataset(name)
        except NameNotFoundError:
            return self.get(name)

    def __contains__(self, name: object) -> bool:
        try:
            self.info(name)
        except NameNotFoundError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.get_list())

    def __iter__(self) -> Iterator[str]:
        return iter(self.get_list())

    def __delitem__(self, name: str) -> None:
        self.delete(name)


_ATTR_VALUES = (str, int, float, bool, type(None))


def _attrs(attrs: Any) -> dict:
    """h5py's attrs as the YellowPages keeps them: str keys, and values that are str,
    int, float, bool, None or lists of those (they travel in Dask's messages)."""
    if attrs is None:
        return {}
    ok = isinstance(attrs, dict) and all(
        isinstance(k, str)
        and (isinstance(v, _ATTR_VALUES) or (isinstance(v, list) and all(isinstance(x, _ATTR_VALUES) for x in v)))
        for k, v in attrs.items()
    )
    if not ok:
        raise arguments.refuse("attrs", attrs, "a dict of str keys to str, int, float, bool, None or lists of them")
    return dict(attrs)
