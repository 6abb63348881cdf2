"""Turn what a user hands to ``insert`` into a type and one copy into shared memory.

Accepted: anything with the buffer protocol (numpy arrays of any layout, bytes,
bytearray, memoryview, mmap) and open binary files.  A contiguous buffer is copied with
one memcpy; a strided numpy array with one ``np.copyto`` (still one pass); a file is read
with ``readinto`` straight into the destination, with no buffer in between.  Sizes are
checked before any memory is reserved, so a refused insert leaves nothing behind.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from datafabric.errors import InvalidBufferError, InvalidTypeError, TypeMismatchError
from datafabric.types import FabricType, parse_type


@dataclass(frozen=True)
class Source:
    type: FabricType
    copy_into: Callable[[memoryview], None]  # receives a writable byte view of exactly type.nbytes


def prepare(tp: Any, buf: Any) -> Source:
    if isinstance(buf, np.ndarray) and buf.dtype.hasobject:
        raise _holds_objects(buf.dtype)
    if _is_numpy_dtype(tp):
        return _from_dtype(np.dtype(tp), buf)
    ftype = parse_type(tp)
    if _has_buffer(buf):
        arr = _as_array(buf)
        if arr.nbytes != ftype.nbytes:
            raise _size_mismatch(ftype, arr.nbytes, "buffer holds")
        return Source(ftype, _array_copier(arr))
    if _is_binary_file(buf):
        size = _remaining(buf)
        if size != ftype.nbytes:
            raise _size_mismatch(ftype, size, "file has")
        return Source(ftype, _file_copier(buf))
    raise _not_a_buffer(buf)


def _from_dtype(dtype: np.dtype, buf: Any) -> Source:
    """A numpy dtype gives the element; the shape comes from the data."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != dtype:
            raise TypeMismatchError(
                f"the array's dtype is {buf.dtype} but the type given is {dtype}; "
                f"pass arr.astype({dtype.str!r}) or the array's own dtype"
            )
        return Source(parse_type(dtype, shape=buf.shape), _array_copier(buf))
    if _has_buffer(buf):
        arr = _as_array(buf)
        count = _count(arr.nbytes, dtype, "buffer")
        return Source(parse_type(dtype, shape=(count,)), _array_copier(arr))
    if _is_binary_file(buf):
        count = _count(_remaining(buf), dtype, "file")
        return Source(parse_type(dtype, shape=(count,)), _file_copier(buf))
    raise _not_a_buffer(buf)


def _size_mismatch(ftype: FabricType, nbytes: int, what: str) -> TypeMismatchError:
    hint = ""
    if ftype.nbytes and nbytes % ftype.nbytes == 0:
        hint = f"; for {nbytes // ftype.nbytes} items give '{nbytes // ftype.nbytes} * {ftype.datashape}'"
    return TypeMismatchError(f"type {ftype.datashape} is {ftype.nbytes} bytes but the {what} {nbytes} bytes{hint}")


def _count(nbytes: int, dtype: np.dtype, what: str) -> int:
    if dtype.itemsize == 0 or nbytes % dtype.itemsize:
        raise TypeMismatchError(f"the {what} holds {nbytes} bytes, not a whole number of {dtype} items")
    return nbytes // dtype.itemsize


def _array_copier(arr: np.ndarray) -> Callable[[memoryview], None]:
    if arr.flags.c_contiguous:
        # bytes through a uint8 view: the buffer protocol refuses datetime64 and timedelta64
        raw = memoryview(arr.reshape(-1).view(np.uint8)) if arr.nbytes else memoryview(b"")

        def copy(dest: memoryview) -> None:
            dest[:] = raw

        return copy

    def copy_strided(dest: memoryview) -> None:
        np.copyto(np.frombuffer(dest, dtype=arr.dtype).reshape(arr.shape), arr, casting="no")

    return copy_strided


def _file_copier(f: Any) -> Callable[[memoryview], None]:
    def copy(dest: memoryview) -> None:
        done = 0
        while done < len(dest):
            n = f.readinto(dest[done:])
            if not n:
                raise TypeMismatchError(f"the file ended after {done} of {len(dest)} bytes")
            done += n

    return copy


def _as_array(buf: Any) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf
    mv = memoryview(buf)
    if "O" in mv.format:  # a memoryview of an object array: same pointers, no dtype to say so
        raise _holds_objects(mv.format)
    if not mv.contiguous:
        return np.asarray(mv)  # strided memoryview: numpy copies it in one pass
    return np.frombuffer(mv.cast("B"), np.uint8) if mv.nbytes else np.empty(0, np.uint8)


def _has_buffer(buf: Any) -> bool:
    if isinstance(buf, np.ndarray):  # memoryview() refuses datetime64 arrays, numpy holds their bytes
        return True
    try:
        memoryview(buf).release()
    except (TypeError, ValueError):  # ValueError: a closed mmap or released memoryview
        return False
    return True


def _is_binary_file(buf: Any) -> bool:
    return hasattr(buf, "readinto") and not isinstance(buf, io.TextIOBase)


def _remaining(f: Any) -> int:
    """Bytes from the file's position to its end, asked of the OS, not read."""
    try:
        if f.closed:
            raise InvalidBufferError("the file is closed; open it again in binary mode ('rb')")
        pos = f.tell()
        try:
            return os.fstat(f.fileno()).st_size - pos
        except (OSError, io.UnsupportedOperation):
            end = f.seek(0, io.SEEK_END)
            f.seek(pos)
            return end - pos
    except (OSError, ValueError, io.UnsupportedOperation) as exc:
        raise InvalidBufferError(f"cannot tell how many bytes the file holds: {exc}") from None


def _is_numpy_dtype(tp: Any) -> bool:
    return isinstance(tp, np.dtype) or (isinstance(tp, type) and issubclass(tp, np.generic))


def _holds_objects(kind: Any) -> InvalidTypeError:
    """Its bytes are PyObject pointers, meaningless in any other process."""
    return InvalidTypeError(
        f"cannot store data of type {kind}: it holds Python objects (pointers into this process), not values; "
        "convert it to a fixed-size dtype first, e.g. arr.astype('float64') or arr.astype('U10')"
    )


def _not_a_buffer(buf: Any) -> InvalidBufferError:
    if isinstance(buf, io.TextIOBase):
        return InvalidBufferError("the file is open in text mode; open it in binary mode ('rb')")
    return InvalidBufferError(
        f"cannot insert a {type(buf).__name__}: give a numpy array, bytes, a memoryview, an mmap "
        "or a file opened in binary mode"
    )
