"""Variable names: the rules, in one place, for every entry point."""

from __future__ import annotations

import unicodedata

from datafabric.errors import InvalidNameError

MAX_NAME_BYTES = 255
# Names of the variables holding datasets' chunks: the fabric's own, refused for anything
# a user writes, so no user name collides with one.  ``.dfab/<dataset id>/<chunk>``, and
# ``.dfab/<dataset id>/dataset`` for a sealed dataset's record (``yp/dataset_records.py``).
CHUNK_PREFIX = ".dfab/"
RECORD_PART = "dataset"


def validate_name(name: object) -> str:
    """Names are keys, never paths: any UTF-8 text without control characters; ``/`` is
    allowed so users can build hierarchies (``run1/temps``)."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a variable name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidNameError("a variable name must not be empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNameError(f"variable name {name!r} is not valid UTF-8 (lone surrogates)") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidNameError(f"variable name is {len(encoded)} bytes of UTF-8; the limit is {MAX_NAME_BYTES}")
    bad = [] if name.isprintable() else [c for c in name if unicodedata.category(c) == "Cc"]  # fast path: no Cc
    if bad:
        raise InvalidNameError(f"variable name {name!r} contains control characters {bad!r}; use printable text")
    return name


def validate_new_name(name: object) -> str:
    """A name for something a user writes (a variable, a dataset): ``validate_name``'s
    rules, and not in the fabric's own namespace of chunk variables."""
    validate_name(name)
    if name.startswith(CHUNK_PREFIX):
        raise InvalidNameError(f"names beginning with {CHUNK_PREFIX!r} are the fabric's own (dataset chunks)")
    return name


def chunk_name(dataset_id: int, flat: int) -> str:
    return f"{CHUNK_PREFIX}{dataset_id}/{flat}"


def record_name(dataset_id: int) -> str:
    return f"{CHUNK_PREFIX}{dataset_id}/{RECORD_PART}"


def is_chunk_name(name: str) -> bool:
    """One of the fabric's own names: a dataset's chunk or record."""
    return name.startswith(CHUNK_PREFIX)


def dataset_part(name: str) -> tuple[int, str] | None:
    """``(dataset id, part)`` of a name made by ``chunk_name`` or ``record_name``: the part
    is a flat chunk index in decimal, or ``RECORD_PART``.  None for any other name.  Digits
    are ASCII ones: ``str.isdigit`` also takes ones ``int`` cannot read (``²``), and any
    name reaches here (a get of it looks for a chunk in columns)."""
    if not name.startswith(CHUNK_PREFIX):
        return None
    did, _, part = name[len(CHUNK_PREFIX) :].partition("/")
    if not _decimal(did) or not (_decimal(part) or part == RECORD_PART):
        return None
    return int(did), part


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()
