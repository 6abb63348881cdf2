"""What an import reads: an HDF5 dataset, a zarr array or a .npy file, opened as a
``Source`` that describes the array (shape, dtype, chunks, fill value, attributes) and
reads any box of it into memory it is handed.

A file is named as on the command line: ``data.h5:/group/dataset`` (the inner path may be
left out when the file holds one dataset), ``dir.zarr`` (zarr v2 or v3) or ``big.npy``.
h5py and zarr are optional: each is imported only when a file needs it.  Attributes are
kept when a dataset's attrs can carry them (str keys; str, int, float, bool, or flat
lists of those); the others are dropped, and named in ``dropped``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datafabric.errors import FileFormatError

H5_SUFFIXES = (".h5", ".hdf5", ".he5", ".hdf")
_INNER = re.compile(r"^(.*?(?:" + "|".join(re.escape(s) for s in H5_SUFFIXES) + r")):(.*)$", re.IGNORECASE)


@dataclass
class Source:
    """An n-d array in a file.  ``read(view, box)`` writes the elements of ``box`` (a
    tuple of slices with step 1) into ``view``, a C-contiguous array of the box's shape;
    ``chunks`` is the file's own chunk shape, None when it has none."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None
    fillvalue: Any
    attrs: dict
    read: Callable[[np.ndarray, tuple[slice, ...]], None]
    dropped: list[str] = field(default_factory=list)  # attributes not kept, each with why


DOC_ATTR = "datafabric:doc"
"""The attribute that carries a dataset's (or variable's) ``doc`` in an exported HDF5 or
zarr file, and becomes the ``doc`` again when the file is imported (the fabric's own
name: an attribute of that name is not kept among a dataset's attrs)."""


def kind(spec: str) -> str | None:
    """ "h5", "zarr" or "npy" for a file an import reads as a dataset's source; None for
    anything else (a raw file)."""
    path = split_inner(spec)[0]
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        return "h5"
    if suffix == ".zarr":
        return "zarr"
    return "npy" if suffix == ".npy" else None


def split_inner(spec: str) -> tuple[Path, str | None]:
    """``'a.h5:/g/d'`` -> ``(Path('a.h5'), '/g/d')``; a path that exists as given is whole."""
    match = _INNER.match(spec)
    if match is None or Path(spec).exists():
        return Path(spec), None
    return Path(match.group(1)), match.group(2)


def open_source(spec: str, stack: ExitStack) -> Source:
    """The array ``spec`` names, its file kept open by ``stack``."""
    path, inner = split_inner(spec)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or directory")
    opener = {"h5": _open_h5, "zarr": _open_zarr, "npy": _open_npy}[kind(spec) or ""]
    return opener(path, inner, stack)


# -- HDF5 ----------------------------------------------------------------------------------


def _open_h5(path: Path, inner: str | None, stack: ExitStack) -> Source:
    h5py = optional_module("h5py", "h5py")
    try:
        f = stack.enter_context(h5py.File(path, "r"))
    except OSError as exc:
        raise FileFormatError(f"{path} is not an HDF5 file h5py can open: {exc}") from None
    names: list[str] = []
    f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    if inner is None:
        if len(names) != 1:
            found = ", ".join(names[:20]) if names else "none"
            raise FileFormatError(f"{path} holds {len(names)} datasets ({found}): name one, as {path}:/path/to/dataset")
        inner = names[0]
    obj = f.get(inner)
    if not isinstance(obj, h5py.Dataset):
        what = f"{inner} is a group" if isinstance(obj, h5py.Group) else f"nothing is at {inner}"
        raise FileFormatError(f"in {path}, {what}, not a dataset; its datasets: {', '.join(names[:20]) or 'none'}")
    if obj.dtype.hasobject:
        raise FileFormatError(
            f"{path}:{inner} holds variable-length values ({obj.dtype}), which a dataset cannot take: "
            "convert it to a fixed-size dtype first"
        )
    attrs, dropped = json_attrs(dict(obj.attrs.items()))

    def read(view: np.ndarray, box: tuple[slice, ...]) -> None:
        if view.size:
            obj.read_direct(view, source_sel=box if box else np.s_[()])

    return Source(path, obj.shape, obj.dtype, obj.chunks, obj.fillvalue, attrs, read, dropped)


# -- zarr --------------------------------------------------------------------------------


def _open_zarr(path: Path, inner: str | None, stack: ExitStack) -> Source:
    zarr = optional_module("zarr", "zarr")
    from zarr.core.buffer import default_buffer_prototype

    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as exc:  # zarr raises several kinds for a store that is not an array
        raise FileFormatError(f"{path} is not a zarr array zarr can open: {type(exc).__name__}: {exc}") from None
    nd_buffer = default_buffer_prototype().nd_buffer
    attrs, dropped = json_attrs(arr.attrs.asdict())

    def read(view: np.ndarray, box: tuple[slice, ...]) -> None:
        arr.get_basic_selection(box, out=nd_buffer.from_numpy_array(view))  # zarr decodes into view

    fill = 0 if arr.fill_value is None else arr.fill_value
    return Source(path, arr.shape, arr.dtype, arr.chunks, fill, attrs, read, dropped)


# -- .npy --------------------------------------------------------------------------------


def _open_npy(path: Path, inner: str | None, stack: ExitStack) -> Source:
    try:
        with path.open("rb") as f:
            np.lib.format.read_magic(f)
        arr = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as exc:
        raise FileFormatError(f"{path} is not a .npy file numpy can map: {exc}") from None

    def read(view: np.ndarray, box: tuple[slice, ...]) -> None:
        view[...] = arr[box]  # the one copy: from the page cache into the view

    return Source(path, arr.shape, arr.dtype, None, 0, {}, read)


# -- attributes --------------------------------------------------------------------------

_SCALARS = (str, int, float, bool)


def json_attrs(attrs: dict) -> tuple[dict, list[str]]:
    """(kept, dropped): the attributes a dataset's attrs can carry, as Python values
    (numpy scalars, bytes that are UTF-8, and 1-d arrays become str, int, float, bool and
    flat lists), and the names of the others with why."""
    kept, dropped = {}, []
    for key, value in attrs.items():
        converted = _attr_value(value)
        if isinstance(key, str) and converted is not None:
            kept[key] = converted
        else:
            dropped.append(f"{key} ({_why(value)})")
    return kept, dropped


def _attr_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            return None
        items = [_scalar(v) for v in value.tolist()] if value.dtype.kind != "V" else [None]
        return None if any(v is None for v in items) else items
    if isinstance(value, list):
        items = [_scalar(v) for v in value]
        return None if any(v is None for v in items) else items
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic) and value.dtype.kind in "biufS":
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None  # attrs travel as JSON, which has no nan or inf
    return value if isinstance(value, _SCALARS) else None


def _why(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim > 1:
        return f"a {value.ndim}-d array"
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return "nan or inf, which JSON cannot carry"
    if isinstance(value, bytes | np.bytes_):
        return "bytes that are not UTF-8"
    return f"a {type(value).__name__} value"


def optional_module(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise FileFormatError(f"reading this file needs {module}: pip install 'datafabric[{extra}]'") from None
