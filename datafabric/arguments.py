"""Checks of the public methods' arguments other than names, types and buffers.

They run in the caller's process before anything is sent, so a bad argument is
refused with an ``InvalidArgumentError`` that names the argument, what it got and what
is accepted, instead of a builtin error from deep in a handler (``int("x")``,
``nan * 2**20``) or, worse, a quiet misreading (``replicate(name, -1)`` slicing off the
last node, ``True`` taken as 1).
"""

from __future__ import annotations

import math
import numbers
import reprlib
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from datafabric.errors import InvalidArgumentError

MAX_DOC_BYTES = 65536
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def refuse(what: str, value: Any, accepted: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{what} must be {accepted}, not {_short.repr(value)} ({type(value).__name__})")


def megabytes(value: Any, what: str) -> float:
    """A finite number above zero, and below 2**40 MiB (an exbibyte), so that it stays a
    finite count of bytes; bools are refused though Python counts them as ints."""
    accepted = "a number of megabytes above 0 and below 2**40"
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise refuse(what, value, accepted)
    if not 0 < value < 2**40:
        raise refuse(what, value, accepted)
    return float(value)


MAX_WHOLE = 2**63 - 1  # what every message between the parts can carry (msgpack's int64)


def whole(value: Any, what: str) -> int:
    """A non-negative int (numpy integers too) that a message can carry, never a bool or
    a float."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_WHOLE:
        raise refuse(what, value, "an int of 0 or more, below 2**63")
    return int(value)


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise refuse(what, value, "a str")
    return value


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise refuse(what, value, "True or False")
    return bool(value)


def doc(value: Any) -> str:
    if not isinstance(value, str):
        raise refuse("doc", value, "a str")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError("doc is not valid UTF-8 text (it holds lone surrogates)") from None
    if len(encoded) > MAX_DOC_BYTES:
        raise InvalidArgumentError(f"doc is longer than {MAX_DOC_BYTES} bytes; keep documentation short")
    return value


def replica_targets(nodes: Any) -> dict:
    """``replicate``'s ``nodes``: None (every node), a count of more nodes, or node names."""
    if nodes is None:
        return {"nodes": None}
    if isinstance(nodes, numbers.Integral) and not isinstance(nodes, bool | np.bool_):
        return {"count": whole(nodes, "nodes (a count of more nodes)")}
    accepted = "None, an int of 0 or more, or a list of node names (str)"
    if isinstance(nodes, str | bytes) or not isinstance(nodes, Iterable):
        raise refuse("nodes", nodes, accepted)
    names = list(nodes)
    if not all(isinstance(n, str) for n in names):
        raise refuse("nodes", names, accepted)
    return {"nodes": names}


def items(value: Any) -> list[tuple[Any, Any, Any, Any]]:
    """``insert_many``'s items: an iterable of ``(name, doc, tp, buf)``, all read first."""
    accepted = "an iterable of (name, doc, tp, buf) tuples"
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        raise refuse("items", value, accepted)
    listed = list(value)
    for i, item in enumerate(listed):
        if not isinstance(item, tuple | list) or len(item) != 4:
            raise refuse(f"items[{i}]", item, "a (name, doc, tp, buf) tuple")
    return [tuple(item) for item in listed]


def names(value: Any) -> list[str]:
    """``get_many``'s names: an iterable of str, all read first (a lone str is refused, not
    read as its characters)."""
    accepted = "an iterable of variable names (str)"
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        raise refuse("names", value, accepted)
    listed = list(value)
    for i, name in enumerate(listed):
        if type(name) is not str:
            raise refuse(f"names[{i}]", name, "a str")
    return listed


ZERO = np.zeros((), np.uint8)  # the default fill: every byte 0, so 0, 0.0, b"" and "" alike


def fill_value(fill: Any, dtype: np.dtype) -> np.ndarray | None:
    """``create``'s fill as a 0-d array of the variable's dtype, refused if that dtype
    cannot hold it exactly (``1.5`` for an int, ``nan`` for an int, ``300`` for int8);
    None means no fill."""
    if fill is None:
        return None
    if type(fill) is int and fill == 0:
        return ZERO
    accepted = f"None, or one value that {dtype} holds exactly"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns, rather than fails, on some lossy casts
            value = np.asarray(fill, dtype=dtype)
            exact = value.shape == () and (dtype.kind not in "biufc" or bool(value == fill or fill != fill))
    except Exception:  # numpy raises TypeError, ValueError, OverflowError, warnings... for such values
        raise refuse("fill", fill, accepted) from None
    if not exact:
        raise refuse("fill", fill, accepted)
    return value
