"""A fabric dataset as zarr v3 metadata, and zarr v3 metadata as a dataset to create.

The two directions meet in ``ArraySpec``: what a fabric dataset fixes at creation
(shape, dtype, chunks, fill value, attrs).  zarr's own metadata classes write and parse
the JSON, so fill values, data types and byte order are encoded as zarr encodes them.

- Data types: whatever zarr v3 has a data type for (``zarr.core.dtype``); a byte order
  other than the machine's travels in the ``bytes`` codec's ``endian``, as zarr v3 keeps
  it.  A structured type whose fields are not little-endian is refused: zarr v3's JSON
  keeps no byte order per field.
- Codecs: the ``bytes`` codec only (a chunk's bytes are the fabric's plain numpy
  buffer); compressors, filters, sharding and storage transformers are refused, naming
  the argument of ``zarr.create_array`` that turns them off.
- Dimension names: the ``_ARRAY_DIMENSIONS`` attr (xarray's convention), else a ``dims``
  attr, when it is a list of one str per dimension; else ``<leaf>_dim_<axis>``, ``leaf``
  the last ``/`` part of the dataset's name (distinct per dataset, so xarray never sees
  two sizes for one dimension).  The attr used is not repeated in ``attributes``;
  ``dimension_names`` given to zarr are kept as ``_ARRAY_DIMENSIONS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.dtype import get_data_type_from_native_dtype
from zarr.core.group import ConsolidatedMetadata, GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata

from datafabric.datasets.grid import normalize_chunks
from datafabric.errors import InvalidArgumentError, InvalidTypeError

DIMS_ATTRS = ("_ARRAY_DIMENSIONS", "dims")  # in this order: the first that is a valid list wins


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    fill: bytes  # the fill value's bytes, in ``dtype``
    attrs: dict  # the dataset's attrs: ``dimension_names`` kept as ``_ARRAY_DIMENSIONS``


def spec_of(ds: Any) -> ArraySpec:
    """A dataset's spec; its attrs as JSON has them (Dask's messages turn lists into tuples)."""
    return ArraySpec(ds.shape, ds.dtype, ds.chunks, ds._fill.tobytes(), json.loads(json.dumps(ds.attrs)))


def dimension_names(name: str, spec: ArraySpec) -> tuple[tuple[str, ...], str | None]:
    """The dimension names zarr is given, and the attr they came from (None: the default)."""
    for attr in DIMS_ATTRS:
        value = spec.attrs.get(attr)
        if isinstance(value, list | tuple) and len(value) == len(spec.shape) and all(isinstance(v, str) for v in value):
            return tuple(value), attr
    leaf = name.rsplit("/", 1)[-1]
    return tuple(f"{leaf}_dim_{axis}" for axis in range(len(spec.shape))), None


def array_metadata(name: str, spec: ArraySpec) -> ArrayV3Metadata:
    dims, used = dimension_names(name, spec)
    fill = np.frombuffer(spec.fill, spec.dtype).reshape(())[()]
    return ArrayV3Metadata(
        shape=spec.shape,
        data_type=zarr_type(spec.dtype),
        chunk_grid=RegularChunkGrid(chunk_shape=spec.chunks),
        chunk_key_encoding=DefaultChunkKeyEncoding(separator="/"),
        fill_value=fill,
        codecs=[BytesCodec(endian=_endian(spec.dtype))],
        attributes={k: v for k, v in spec.attrs.items() if k != used},
        dimension_names=dims,
    )


def document(metadata: ArrayV3Metadata | GroupMetadata) -> bytes:
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def group_metadata(members: dict[str, ArrayV3Metadata | GroupMetadata]) -> GroupMetadata:
    """A group with no attributes of its own whose consolidated metadata lists
    ``members`` (paths relative to it), so one read opens the whole hierarchy."""
    return GroupMetadata(attributes={}, consolidated_metadata=ConsolidatedMetadata(metadata=members))


def zarr_type(dtype: np.dtype) -> Any:
    try:
        ztype = get_data_type_from_native_dtype(dtype)
    except (ValueError, TypeError) as exc:
        raise InvalidTypeError(
            f"zarr v3 has no data type for {dtype} ({exc}); such a dataset is not readable by zarr"
        ) from None
    if dtype.fields and any(dtype.fields[f][0].byteorder == ">" for f in dtype.fields):
        raise InvalidTypeError(
            f"structured dtype {dtype} has big-endian fields; zarr v3 keeps no byte order per field: "
            "store the fields little-endian"
        )
    return ztype


def _has_byte_order(dtype: np.dtype) -> bool:
    """As zarr's ``bytes`` codec sees it: bytes, records and one-byte types have none."""
    return dtype.itemsize > 1 and dtype.kind not in "SV"


def _endian(dtype: np.dtype) -> str | None:
    if not _has_byte_order(dtype):
        return None
    return "big" if dtype.byteorder == ">" else "little"


def node_type(doc: bytes) -> str | None:
    try:
        parsed = json.loads(doc)
    except ValueError:
        raise InvalidArgumentError("zarr metadata that is not JSON") from None
    return parsed.get("node_type") if isinstance(parsed, dict) else None


def parse_array(doc: bytes) -> ArraySpec:
    """The dataset that zarr ``array`` metadata describes; refused if its chunks need anything
    but the ``bytes`` codec or the default chunk keys, or it changes a grid the fabric keeps."""
    try:
        meta = ArrayV3Metadata.from_dict(json.loads(doc))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgumentError(f"zarr array metadata the store cannot use: {exc}") from None
    _refuse_codecs(meta)
    if not isinstance(meta.chunk_grid, RegularChunkGrid):
        raise InvalidArgumentError("a fabric dataset has a regular chunk grid: give chunks=(...) to zarr")
    encoding = meta.chunk_key_encoding
    if not isinstance(encoding, DefaultChunkKeyEncoding) or encoding.separator != "/":
        raise InvalidArgumentError(
            "a fabric dataset's zarr chunk keys are zarr v3's default ('c/0/0'): "
            "leave chunk_key_encoding at its default"
        )
    dtype = meta.dtype.to_native_dtype()
    endian = meta.codecs[0].endian
    if endian is not None and _has_byte_order(dtype):
        dtype = dtype.newbyteorder(">" if endian.value == "big" else "<")
    shape, chunks = tuple(meta.shape), tuple(meta.chunk_grid.chunk_shape)
    if normalize_chunks(chunks, shape, dtype.itemsize) != chunks:
        raise InvalidArgumentError(
            f"chunks {chunks} are longer than shape {shape} in some dimension; a fabric dataset's chunks are not: "
            f"give chunks={normalize_chunks(chunks, shape, dtype.itemsize)}"
        )
    attrs = dict(meta.attributes)
    if meta.dimension_names is not None and any(d is not None for d in meta.dimension_names):
        attrs["_ARRAY_DIMENSIONS"] = [str(d) for d in meta.dimension_names]
    fill = np.asarray(meta.fill_value, dtype).tobytes()
    return ArraySpec(shape, dtype, chunks, fill, attrs)


def _refuse_codecs(meta: ArrayV3Metadata) -> None:
    codecs = list(meta.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        raise InvalidArgumentError(
            f"codecs {[type(c).__name__ for c in codecs]}: a fabric dataset's chunks are plain bytes; "
            "give zarr.create_array filters=None, shards=None and serializer='auto' (the bytes codec)"
        )
    if len(codecs) > 1:
        raise InvalidArgumentError(
            f"codecs {[type(c).__name__ for c in codecs[1:]]} after the bytes codec: a fabric dataset's chunks are "
            "uncompressed; give zarr.create_array compressors=None (and filters=None)"
        )
    if meta.storage_transformers:
        raise InvalidArgumentError("storage transformers are not taken: give none")


def parse_group(doc: bytes) -> None:
    """A group written through the store: a fabric group is its datasets' names, so it may
    carry no attributes of its own."""
    try:
        meta = GroupMetadata.from_dict(json.loads(doc))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgumentError(f"zarr group metadata the store cannot use: {exc}") from None
    if meta.attributes:
        raise InvalidArgumentError(
            "a fabric group is the names of its datasets and has no attributes of its own: "
            "give attributes to the arrays (zarr.create_array(..., attributes=...))"
        )


def describe_change(old: ArraySpec, new: ArraySpec) -> str | None:
    """What new metadata would change of an existing dataset (None: nothing)."""
    for field in ("shape", "dtype", "chunks", "fill", "attrs"):
        if getattr(old, field) != getattr(new, field):
            return f"its {field} from {getattr(old, field)!r} to {getattr(new, field)!r}"
    return None
