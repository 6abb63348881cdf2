"""The slice of ``datafabric show NAME[SLICE]``, read from a string that comes from the
command line and so is never evaluated: only integers, ``start:stop:step`` and ``...``
are accepted.
"""

from __future__ import annotations

import ast
from types import EllipsisType

from datafabric.cli.app import CliError


def parse_selection(text: str) -> tuple[str, tuple | None, str | None]:
    """``'temps[0, :10]'`` -> ``('temps', (0, slice(None, 10)), '0, :10')``.  The name ends
    at the first ``[``; the slice is read with ``ast``, never evaluated."""
    if "[" not in text:
        return text, None, None
    if not text.endswith("]"):
        raise _bad_slice(text[text.index("[") + 1 :], "it does not end with ]")
    cut = text.index("[")
    name, inner = text[:cut], text[cut + 1 : -1]
    return name, parse_index(inner), inner


def parse_index(text: str) -> tuple:
    """A numpy index from ints, negative ints, ``start:stop:step`` and ``...`` only."""
    try:
        tree = ast.parse(f"_[{text}]", mode="eval").body
    except SyntaxError:
        raise _bad_slice(text, "it does not parse") from None
    if not (isinstance(tree, ast.Subscript) and isinstance(tree.value, ast.Name)):
        raise _bad_slice(text, "use one pair of brackets, e.g. [0, 1:5]")
    parts = tree.slice.elts if isinstance(tree.slice, ast.Tuple) else [tree.slice]
    return tuple(_index_part(text, part) for part in parts)


def _index_part(text: str, node: ast.expr) -> int | slice | EllipsisType:
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return Ellipsis
    if isinstance(node, ast.Slice):
        return slice(*(None if n is None else _integer(text, n) for n in (node.lower, node.upper, node.step)))
    return _integer(text, node)


def _integer(text: str, node: ast.expr) -> int:
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    raise _bad_slice(text, f"{ast.unparse(node)!r} is not an integer, a start:stop:step slice or ...")


def _bad_slice(text: str, why: str) -> CliError:
    return CliError(f"bad slice [{text}]: {why}")
