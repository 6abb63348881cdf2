"""Spell a numpy dtype as the datashape whose ndtypes layout is exactly numpy's.

The stored type string is the only type the fabric keeps, so it must say everything about
the bytes that numpy needs to read them back: byte order (ndtypes writes ``>int32``),
``datetime64``/``timedelta64`` units (which ndtypes has no type for: they are spelled as
constructors over their int64, ``Datetime64_ns(int64)``, which ndtypes lays out as the
int64 and which need no registry in any process) and where each record field sits.

ndtypes places field i at ``round_up(end of field i-1, align_i)`` and pads a record to a
multiple of its largest field alignment, where ``align_i`` is the field type's natural
alignment, or 1 for every field under the record attribute ``pack=1``, or exactly ``n``
under the field attribute ``|pack=n|``; the record attribute ``align=n`` raises the end
padding.  ``str()`` of an ndt drops all of these, so this module writes them itself, for
the first of three layouts that reproduces numpy's offsets and itemsize exactly:

1. natural, with no attribute: the C layout (numpy's ``align=True``);
2. packed, ``pack=1``: numpy's default for structured dtypes;
3. explicit: ``|pack=n|`` on each field whose natural alignment would misplace it, and
   ``align=n`` on the record when the end padding needs it.

Layouts that none of these can say (a gap before the first field, overlapping or
out-of-order fields, a gap that ends nowhere near a power-of-two boundary) are refused
with what to do instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from datafabric.errors import InvalidTypeError

NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32"}
NUMERIC |= {"float64", "complex64", "complex128"}
_TIME_NAMES = {"M": "Datetime64", "m": "Timedelta64"}
_TIME = re.compile(r"(Datetime64|Timedelta64)(?:_([1-9]\d*)?(Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as))?")
_MAX_ALIGN = 1 << 15  # ndtypes keeps alignments in a uint16


def time_dtype(constructor: str, order: str) -> np.dtype | None:
    """The numpy datetime64/timedelta64 that ``constructor(int64)`` names, or None."""
    match = _TIME.fullmatch(constructor)
    if match is None:
        return None
    code = "M8" if match[1] == "Datetime64" else "m8"
    unit = f"[{match[2] or ''}{match[3]}]" if match[3] else ""
    return np.dtype(f"{order}{code}{unit}")


def spell(dims: tuple[int, ...], element: np.dtype) -> str:
    """The datashape of an array of ``dims`` of ``element``, layout and byte order kept."""
    return " * ".join([*map(str, dims), _element(element)[0]])


@dataclass(frozen=True)
class _Field:
    name: str
    text: str  # its datashape, dimensions included
    align: int  # the alignment ndtypes gives that datashape
    offset: int
    size: int

    def spelled(self, pack: int | None = None) -> str:
        return f"{self.name} : {self.text}" + ("" if pack is None else f" |pack={pack}|")


def _element(dtype: np.dtype) -> tuple[str, int]:
    """The datashape of one element and the alignment ndtypes gives it."""
    if dtype.subdtype is not None:
        base, dims = dtype.subdtype
        text, align = _element(base)
        return " * ".join([*map(str, dims), text]), align
    if dtype.names is not None:
        return _record(dtype)
    big = dtype.byteorder == ">"
    if dtype.name in NUMERIC:
        return (">" if big else "") + dtype.name, dtype.alignment
    if dtype.kind in _TIME_NAMES:
        unit, count = np.datetime_data(dtype)
        suffix = "" if unit == "generic" else f"_{count if count != 1 else ''}{unit}"
        return f"{_TIME_NAMES[dtype.kind]}{suffix}({'>' if big else ''}int64)", dtype.alignment
    if dtype.kind == "S":
        return f"fixed_string({dtype.itemsize}, 'ascii')", 1
    if dtype.kind == "U":
        if big:
            raise InvalidTypeError(
                f"numpy dtype {dtype.str} is big-endian UTF-32, which a datashape cannot say;"
                f" convert with arr.astype({dtype.newbyteorder('<').str!r})"
            )
        return f"fixed_string({dtype.itemsize // 4}, 'utf32')", 4
    if dtype.kind == "V":
        return f"fixed_bytes(size={dtype.itemsize})", 1
    instead = {"f": "arr.astype('float64')", "c": "arr.astype('complex128')"}.get(dtype.kind, "arr.astype('U20')")
    raise InvalidTypeError(
        f"numpy dtype {dtype} has no fixed-layout datashape (object, variable-width string and platform types like"
        f" float128 are refused); convert the data first, e.g. {instead}"
    )


def _record(dtype: np.dtype) -> tuple[str, int]:
    if len(dtype.fields) != len(dtype.names):
        raise InvalidTypeError(f"numpy dtype {dtype} has field titles, which datashape cannot record; drop them")
    bad = [n for n in dtype.names if not (n.isascii() and n.isidentifier())]
    if bad:
        raise InvalidTypeError(
            f"numpy field names {bad} cannot be written in a datashape; rename them to ASCII identifiers"
        )
    fields = []
    for name in dtype.names:
        field, offset = dtype.fields[name][:2]
        fields.append(_Field(name, *_element(field), offset, field.itemsize))
    return _natural(fields, dtype.itemsize) or _packed(fields, dtype.itemsize) or _explicit(dtype, fields)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _natural(fields: list[_Field], size: int) -> tuple[str, int] | None:
    end, largest = 0, 1
    for f in fields:
        if _round_up(end, f.align) != f.offset:
            return None
        end, largest = f.offset + f.size, max(largest, f.align)
    if _round_up(end, largest) != size:
        return None
    return "{" + ", ".join(f.spelled() for f in fields) + "}", largest


def _packed(fields: list[_Field], size: int) -> tuple[str, int] | None:
    end = 0
    for f in fields:
        if f.offset != end:
            return None
        end += f.size
    if end != size:
        return None
    return "{" + ", ".join([*(f.spelled() for f in fields), "pack=1"]) + "}", 1


def _explicit(dtype: np.dtype, fields: list[_Field]) -> tuple[str, int]:
    """Each field's alignment is the smallest power of two that lands it on its offset,
    which keeps the record's own alignment (their largest) as small as it can be."""
    parts, end, largest = [], 0, 1
    for f in fields:
        gap = f.offset - end
        align = 1 << max(gap, 0).bit_length()
        if gap < 0 or f.offset % align or align > _MAX_ALIGN:
            raise _unlaid(dtype, f"field {f.name!r} at offset {f.offset}, where the fields before it end at {end}")
        parts.append(f.spelled(None if align == f.align else align))
        end, largest = f.offset + f.size, max(largest, align)
    align = largest
    while _round_up(end, align) < dtype.itemsize and align < _MAX_ALIGN:
        align *= 2
    if _round_up(end, align) != dtype.itemsize:
        raise _unlaid(dtype, f"{dtype.itemsize - end} bytes after its last field")
    if align != largest:
        parts.append(f"align={align}")
    return "{" + ", ".join(parts) + "}", align


def _unlaid(dtype: np.dtype, detail: str) -> InvalidTypeError:
    return InvalidTypeError(
        f"numpy dtype {dtype} has {detail}, which no datashape record can lay out (a field starts at the next"
        " multiple of a power of two, the first at 0); copy it into numpy's packed layout first with"
        " numpy.lib.recfunctions.repack_fields(arr)"
    )
