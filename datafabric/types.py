"""One conversion between the ways users spell a variable's type and its numpy layout.

Variables are typed with ndtypes, but their bytes sit in shared memory and are read back
as numpy arrays.  ``put`` accepts an ``ndt``, a datashape string, or a numpy dtype plus
the buffer's shape; the YellowPages stores only the canonical datashape string; ``get``
must rebuild exactly the same (shape, dtype) from that string on any node.  So every
path goes through the canonical string, and any type whose bytes numpy could not view
faithfully is refused here rather than guessed at.

The layout comes from ndtypes itself: the parser walks the tree that ``str(t)`` prints
and takes every field offset, record size and dimension step from ``t``'s own layout, so
numpy reads the bytes where ndtypes put them (an array of scalars whose string parses
back to the same ndt needs no such reading).  The canonical string is ``str(t)`` when
that keeps the layout; ``str`` drops record packing and alignment attributes, so a record
it would misplace is spelled by ``datafabric.spelling``, which writes them.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from ndtypes import ndt

from datafabric.errors import InvalidTypeError
from datafabric.spelling import NUMERIC, spell, time_dtype

MAX_TYPE_BYTES = 65536  # the stored string travels in every reply and sits in every extent header
_STRING_CODES = {"'ascii'": "S", "'utf8'": "S", "'utf32'": "U"}
_SUPPORTED = (
    "supported are fixed dimensions 'd1 * d2 * T' over bool, int8..int64, uint8..uint64, float16/32/64, complex64/128"
    " (native, or big-endian as '>int32'), Datetime64_ns(int64) and Timedelta64_s(int64) (any numpy unit),"
    " fixed_string(n, 'ascii'|'utf8'|'utf32'), fixed_bytes(size=n), and records {name : T, ...} or tuples (T, ...)"
)
_TOKEN = re.compile(r"\d+|[A-Za-z_]\w*|'[^']*'|\S")
_FACT = re.compile(r"\b(datasize|offset|step)=(\d+)")
_COMPOUND = re.compile(r"\{|(?<!\w)\(")  # a record, or a tuple: a parenthesis that follows no name


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
    """Recursive descent over exactly the canonical forms ndtypes prints, reading the
    layout from ``facts``: the ``datasize``, ``offset`` and ``step`` of every node of the
    type, in the order ndtypes' ``ast_repr`` lists them (children before their parent).

    ndtypes 0.2 has no Python API to walk a type, so its canonical string is the only
    faithful view of the tree, and its ``ast_repr`` the only view of its layout; anything
    outside the grammar below has no numpy layout.
    """

    def __init__(self, text: str, facts: Iterator[tuple[str, int]] | None, source: str) -> None:
        self.text = source  # what the user wrote, for messages
        self.tokens = _TOKEN.findall(text)
        self.pos = 0
        self.facts = facts

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

    def fact(self, key: str) -> int:
        found = next(self.facts, None)
        if found is None or found[0] != key:
            raise _disagree(self.text, f"ndtypes' layout has {found} where the parser expects its {key}")
        return found[1]

    def sized(self, dtype: np.dtype) -> np.dtype:
        """dtype, once ndtypes' size for the node just parsed agrees with numpy's."""
        if self.facts is None:
            return dtype
        size = self.fact("datasize")
        if size != dtype.itemsize:
            raise _disagree(self.text, f"{dtype} is {dtype.itemsize} bytes, ndtypes says {size}")
        return dtype

    def parse(self) -> tuple[tuple[int, ...], np.dtype]:
        shape, dtype = self.array()
        if self.peek():
            raise self.unsupported(f"unexpected {self.peek()!r}")
        if self.facts is not None and next(self.facts, None) is not None:
            raise _disagree(self.text, "ndtypes' layout has more nodes than the type")
        return shape, dtype

    def array(self) -> tuple[tuple[int, ...], np.dtype]:
        dims = []
        while self.peek().isdigit():
            dims.append(int(self.take()))
            self.take("*")
        element = self.element()
        size = element.itemsize
        for k in reversed(
            range(len(dims) if self.facts is not None else 0)
        ):  # ndtypes lists the innermost dimension first
            step, datasize = self.fact("step"), self.fact("datasize")
            if step != math.prod(dims[k + 1 :]) or datasize != dims[k] * size:
                raise InvalidTypeError(
                    f"type {self.text!r} sets Fortran order or steps; drop them, the fabric stores only C-ordered data"
                )
            size = datasize
        return tuple(dims), element

    def element(self) -> np.dtype:
        order = self.take() if self.peek() in ("<", ">") else ""
        token = self.take()
        if token in NUMERIC:
            return self.sized(np.dtype(token).newbyteorder(order or "="))
        if order:
            raise self.unsupported(f"byte order {order!r} before {token!r}")
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
            return self.sized(np.dtype(f"{_STRING_CODES[encoding]}{size}"))
        if token == "fixed_bytes":
            for expected in ("(", "size", "="):
                self.take(expected)
            size = int(self.take())
            self.take(")")
            return self.sized(np.dtype(f"V{size}"))
        if self.peek() == "(" and time_dtype(token, "=") is not None:
            self.take("(")
            inner = self.element()
            self.take(")")
            if inner.name != "int64":
                raise self.unsupported(f"{token} holds an int64, not {inner}")
            return self.sized(time_dtype(token, inner.byteorder))
        raise self.unsupported(f"unexpected {token!r}")

    def fields(self, named: bool) -> np.dtype:
        close = "}" if named else ")"
        names: list[str] = []
        formats: list[Any] = []
        offsets: list[int] = []
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
            offsets.append(self.fact("offset"))
        self.take(close)
        if len(set(names)) != len(names):
            raise InvalidTypeError(f"type {self.text!r} repeats a field name, which numpy cannot; make them distinct")
        exact = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": self.fact("datasize")})
        for flavour in (False, True):  # numpy's packed default, then align=True: the familiar reprs
            familiar = np.dtype({"names": names, "formats": formats}, align=flavour)
            if familiar == exact:
                return familiar
        return exact


def _disagree(text: str, detail: str) -> InvalidTypeError:
    return InvalidTypeError(f"internal error: the numpy layout of {text!r} is not ndtypes' ({detail}); please report")


def _layout(t: ndt, source: str, keeps: bool) -> tuple[tuple[int, ...], np.dtype]:
    """The numpy (shape, dtype) of a concrete ndt, every byte where ndtypes puts it.

    Reading ``ast_repr`` costs more than the rest of the parse, and says nothing new for
    a C-ordered array of scalars whose string ``keeps`` its layout: that one is parsed alone."""
    text = str(t)
    if keeps and not _COMPOUND.search(text):
        return _Parser(text, None, source).parse()
    facts = ((key, int(value)) for key, value in _FACT.findall(t.ast_repr()))
    return _Parser(text, facts, source).parse()


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
    Cached: a process sees few distinct types, and parsing one costs tens of µs, a few
    hundred for a packed record (``python -m benchmarks.dtypes``)."""
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
    return _from_numpy(given, _check_shape(shape))


@functools.lru_cache(maxsize=4096)
def _from_numpy(given: np.dtype, shape: tuple[int, ...]) -> FabricType:
    sub, element = _split(given)
    text = spell(shape + sub, element)
    try:
        t = ndt(text)
    except Exception as exc:  # only field names can make our own spelling unparseable
        raise InvalidTypeError(
            f"numpy dtype {given} spells as datashape {text!r}, which ndtypes rejects ({str(exc).strip()});"
            " rename fields that are datashape type names such as 'int8', 'bool' or 'string'"
        ) from None
    result = _from_ndt(t, text)
    if (result.shape, result.dtype, result.dtype.descr) != (shape + sub, element, element.descr):
        raise _disagree(text, f"numpy dtype {given} comes back as {result.dtype}")
    return result


def _from_ndt(t: ndt, source: str) -> FabricType:
    """The numpy layout of t, and a canonical string that keeps it."""
    if not t.isconcrete():
        raise InvalidTypeError(
            f"type {source!r} is abstract; give every dimension a fixed size and every element a concrete type,"
            " e.g. '40 * 20 * float64'"
        )
    text = str(t)
    keeps = ndt(text) == t  # else str() dropped a record's packing or alignment
    shape, dtype = _layout(t, source, keeps)
    if math.prod(shape) * dtype.itemsize != t.datasize:
        raise _disagree(source, f"{shape} x {dtype} is not the {t.datasize} bytes ndtypes computes")
    if not keeps:  # spell them out
        text = spell(shape, dtype)
        again_shape, again = _layout(ndt(text), text, keeps=False)
        if (again_shape, again, again.descr) != (shape, dtype, dtype.descr):
            raise _disagree(source, f"its spelling {text!r} lays out as {again_shape} x {again}")
    if len(text.encode()) > MAX_TYPE_BYTES:
        raise InvalidTypeError(
            f"type {source[:60]!r}... spells as {len(text.encode())} bytes, over the {MAX_TYPE_BYTES} a type may"
            " take; use fewer or shorter field names, or store the fields as separate variables"
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
