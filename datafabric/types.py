"""One conversion between the ways users spell a variable's type and its numpy layout.

Variables are typed with ndtypes, but their bytes sit in shared memory and are read back
as numpy arrays.  ``put`` accepts an ``ndt``, a datashape string, or a numpy dtype plus
the buffer's shape; the YellowPages stores only the canonical datashape string; ``get``
must rebuild exactly the same (shape, dtype) from that string on any node.  So every
path goes through the canonical string, and any type whose bytes numpy could not view
faithfully is refused here rather than guessed at.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from ndtypes import ndt

from datafabric.errors import InvalidTypeError

_SCALARS = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32"}
_SCALARS |= {"float64", "complex64", "complex128"}
_STRING_CODES = {"'ascii'": "S", "'utf8'": "S", "'utf32'": "U"}
_SUPPORTED = (
    "supported are fixed dimensions 'd1 * d2 * T' over bool, int8..int64, uint8..uint64, float16/32/64, complex64/128,"
    " fixed_string(n, 'ascii'|'utf8'|'utf32'), fixed_bytes(size=n), and records {name : T, ...} or tuples (T, ...)"
)
_TOKEN = re.compile(r"\d+|[A-Za-z_]\w*|'[^']*'|\S")


@dataclass(frozen=True)
class FabricType:
    """A variable's type in all the forms the fabric needs, derived once from one string."""

    datashape: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes the variable occupies, so blocks can be sized before any data moves."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndt(self) -> ndt:
        """The ndtypes type, rebuilt from the string since only the string is stored."""
        return ndt(self.datashape)


class _Parser:
    """Recursive descent over exactly the canonical forms ndtypes prints.

    ndtypes 0.2 has no Python API to walk a type, so its canonical string is the only
    faithful view of the tree; anything outside the grammar below has no numpy layout.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _TOKEN.findall(text)
        self.pos = 0

    def unsupported(self, detail: str) -> InvalidTypeError:
        return InvalidTypeError(f"type {self.text!r} has no fixed numpy layout ({detail}); {_SUPPORTED}")

    def peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if not token or (expected is not None and token != expected):
            raise self.unsupported(f"unexpected {token or 'end'!r}")
        self.pos += 1
        return token

    def parse(self) -> tuple[tuple[int, ...], np.dtype]:
        shape, dtype = self.array()
        if self.peek():
            raise self.unsupported(f"unexpected {self.peek()!r}")
        return shape, dtype

    def array(self) -> tuple[tuple[int, ...], np.dtype]:
        dims = []
        while self.peek().isdigit():
            dims.append(int(self.take()))
            self.take("*")
        return tuple(dims), self.element()

    def element(self) -> np.dtype:
        token = self.take()
        if token in _SCALARS:
            return np.dtype(token)
        if token in ("{", "("):
            return self.fields(named=token == "{")
        if token == "fixed_string":
            self.take("(")
            size = int(self.take())
            encoding = "'utf8'"
            if self.peek() == ",":
                self.take(",")
                encoding = self.take()
            self.take(")")
            if encoding not in _STRING_CODES or size == 0:
                raise self.unsupported(f"numpy has no fixed_string({size}, {encoding})")
            return np.dtype(f"{_STRING_CODES[encoding]}{size}")
        if token == "fixed_bytes":
            for expected in ("(", "size", "="):
                self.take(expected)
            size = int(self.take())
            self.take(")")
            return np.dtype(f"V{size}")
        raise self.unsupported(f"unexpected {token!r}")

    def fields(self, named: bool) -> np.dtype:
        close = "}" if named else ")"
        names: list[str] = []
        formats: list[Any] = []
        while self.peek() != close:
            if names:
                self.take(",")
            if named:
                names.append(self.take())
                self.take(":")
            else:
                names.append(f"f{len(names)}")
            shape, dtype = self.array()
            formats.append((dtype, shape) if shape else dtype)
        self.take(close)
        if len(set(names)) != len(names):
            raise InvalidTypeError(f"type {self.text!r} repeats a field name, which numpy cannot; make them distinct")
        return np.dtype({"names": names, "formats": formats}, align=True)


def parse_type(tp: Any, *, shape: tuple[int, ...] | None = None) -> FabricType:
    """Accept whatever the user typed the variable with.

    tp: ndt | str | numpy dtype-like.  For a numpy dtype, `shape` is required (the caller
    passes the buffer's shape); for ndt/str, `shape` is ignored.  A string is a datashape
    unless only numpy makes a concrete type of it: ``"<f8"``, or ``"S5"``, which ndtypes
    reads as a type variable.
    """
    if isinstance(tp, ndt):
        return _from_ndt(tp, str(tp))
    if isinstance(tp, str) and (_as_dtype(tp) is None or _is_concrete_datashape(tp)):
        return from_datashape(tp)
    if shape is None and _as_dtype(tp) is not None:
        raise InvalidTypeError(f"numpy dtype {tp!r} carries no shape; pass shape=buffer.shape or a datashape")
    return from_dtype(tp, shape)


@functools.lru_cache(maxsize=4096)
def from_datashape(text: str) -> FabricType:
    """Rebuild the layout from a datashape, as ``get`` does from the stored string.
    Cached: a process sees few distinct types, and parsing one costs about 15 µs."""
    try:
        t = ndt(text)
    except Exception as exc:  # ndtypes raises ValueError, TypeError, ... for bad text
        raise _unparseable(text, exc) from None
    return _from_ndt(t, text)


def from_dtype(dtype: Any, shape: tuple[int, ...]) -> FabricType:
    """Type a raw buffer, returning exactly what ``from_datashape`` gives for its string."""
    given = _as_dtype(dtype)
    if given is None:
        raise InvalidTypeError(
            f"{dtype!r} is not a type; give an ndt, a datashape such as '40 * 20 * float64', or a numpy dtype"
        )
    if not given.isnative:
        raise InvalidTypeError(
            f"numpy dtype {given} is not in native byte order; convert with arr.astype(arr.dtype.newbyteorder('='))"
        )
    return _from_native_dtype(given, _check_shape(shape))


@functools.lru_cache(maxsize=4096)
def _from_native_dtype(given: np.dtype, shape: tuple[int, ...]) -> FabricType:
    sub, element = _split(given)
    text = _spell(shape + sub, element)
    try:
        t = ndt(text)
    except Exception as exc:  # only field names can make our own spelling unparseable
        raise InvalidTypeError(
            f"numpy dtype {given} spells as datashape {text!r}, which ndtypes rejects ({str(exc).strip()});"
            " rename fields that are datashape type names such as 'int8', 'bool' or 'string'"
        ) from None
    result = _from_ndt(t, text)
    if result.dtype != element:
        raise InvalidTypeError(
            f"numpy dtype {given} is laid out differently from the aligned C layout of {text!r} ({result.dtype});"
            " build it with np.dtype(..., align=True) and no explicit offsets or itemsize"
        )
    return result


def _from_ndt(t: ndt, source: str) -> FabricType:
    """Check that t has one numpy layout and that its canonical string keeps it."""
    if not t.isconcrete():
        raise InvalidTypeError(
            f"type {source!r} is abstract; give every dimension a fixed size and every element a concrete type,"
            " e.g. '40 * 20 * float64'"
        )
    text = str(t)
    if ndt(text) != t:
        raise InvalidTypeError(
            f"type {source!r} sets alignment, packing, Fortran order or steps, which its canonical string {text!r}"
            " loses; drop them, the fabric stores only C-ordered, naturally aligned data"
        )
    shape, dtype = _Parser(text).parse()
    if math.prod(shape) * dtype.itemsize != t.datasize:
        raise InvalidTypeError(
            f"internal error: numpy layout {shape} x {dtype} of {text!r} is not the {t.datasize} bytes ndtypes"
            " computes; please report this type"
        )
    return FabricType(text, shape, dtype)


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = None
    if dims is None or any(d < 0 for d in dims):
        raise InvalidTypeError(f"shape {shape!r} must be a tuple of non-negative ints, such as buffer.shape")
    return dims


def _split(dtype: np.dtype) -> tuple[tuple[int, ...], np.dtype]:
    """A numpy subarray's dims and element; datashape writes those dims as dimensions."""
    dims: tuple[int, ...] = ()
    while dtype.subdtype is not None:
        dtype, sub = dtype.subdtype
        dims += sub
    return dims, dtype


def _spell(dims: tuple[int, ...], element: np.dtype) -> str:
    return " * ".join([*map(str, dims), _spell_element(element)])


def _spell_element(dtype: np.dtype) -> str:
    if dtype.names is not None:
        if len(dtype.fields) != len(dtype.names):
            raise InvalidTypeError(f"numpy dtype {dtype} has field titles, which datashape cannot record; drop them")
        bad = [n for n in dtype.names if not (n.isascii() and n.isidentifier())]
        if bad:
            raise InvalidTypeError(
                f"numpy field names {bad} cannot be written in a datashape; rename them to ASCII identifiers"
            )
        fields = (f"{n} : {_spell(*_split(dtype.fields[n][0]))}" for n in dtype.names)
        return "{" + ", ".join(fields) + "}"
    if dtype.name in _SCALARS:
        return dtype.name
    if dtype.kind == "S":
        return f"fixed_string({dtype.itemsize}, 'ascii')"
    if dtype.kind == "U":
        return f"fixed_string({dtype.itemsize // 4}, 'utf32')"
    if dtype.kind == "V":
        return f"fixed_bytes(size={dtype.itemsize})"
    raise InvalidTypeError(
        f"numpy dtype {dtype} has no fixed-layout datashape (object, datetime, timedelta and platform types like"
        f" float128 are refused); convert the data first, e.g. arr.view('int64') for datetimes; {_SUPPORTED}"
    )


def _is_concrete_datashape(text: str) -> bool:
    try:
        return ndt(text).isconcrete()
    except Exception:  # ndtypes raises ValueError, TypeError, ... for bad text
        return False


def _as_dtype(obj: Any) -> np.dtype | None:
    """numpy's dtype for obj, or None; np.dtype(None) would silently mean float64."""
    if obj is None:
        return None
    try:
        return np.dtype(obj)
    except Exception:  # numpy raises TypeError, ValueError, ... for non-dtypes
        return None


def _unparseable(text: Any, exc: Exception) -> InvalidTypeError:
    return InvalidTypeError(
        f"cannot parse type {text!r}: {str(exc).strip()}; write a datashape such as '40 * 20 * float64'"
        " or '{x : int32, y : float64}'"
    )
