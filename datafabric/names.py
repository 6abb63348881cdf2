"""Variable names: the rules, in one place, for every entry point."""

from __future__ import annotations

import unicodedata

from datafabric.errors import InvalidNameError

MAX_NAME_BYTES = 255


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
