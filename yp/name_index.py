"""The sorted index of visible names: listings by prefix and pages of them, and the
write-once rule a new name must pass.

A listing costs bisections of the sorted index and a slice of it, O(log n + the page), so
``datafabric ls``, ``get_list(prefix)`` and the web page stay instant whatever the number
of names.  A second prefix (the dataset chunks' namespace) can be skipped in the same
bisections.
"""

from __future__ import annotations

import sys
from collections import Counter

from sortedcontainers import SortedDict

from datafabric.errors import NameExistsError


def names(
    index: SortedDict, prefix: str = "", limit: int | None = None, after: str | None = None, hidden: str | None = None
) -> list[str]:
    """Up to ``limit`` visible names starting with ``prefix``, in order, those after
    ``after`` only: a listing's next page starts after the last name of the one before.
    Names starting with ``hidden`` are skipped (dataset chunks). O(log n + the page):
    bisections of the sorted index and slices of it."""
    lo = index.bisect_left(prefix) if after is None or after < prefix else index.bisect_right(after)
    hi = _end_of(index, prefix)
    ranges = [(lo, hi)]
    if hidden is not None:
        start = index.bisect_left(hidden)
        ranges = [(lo, min(hi, start)), (max(lo, _end_of(index, hidden)), hi)]
    out: list[str] = []
    for a, b in ranges:
        if limit is not None:
            b = min(b, a + limit - len(out))
        if a < b:
            out.extend(index.islice(a, b))
    return out


def count(index: SortedDict, prefix: str = "", hidden: str | None = None) -> int:
    """How many visible names start with ``prefix``: bisections, no scan."""
    lo, hi = index.bisect_left(prefix), _end_of(index, prefix)
    if hidden is None:
        return hi - lo
    start, end = index.bisect_left(hidden), _end_of(index, hidden)
    return max(0, min(hi, start) - lo) + max(0, hi - max(lo, end))


def refuse_taken(names: list[str], variables: SortedDict, datasets: dict) -> None:
    """Names are write-once, shared by variables and datasets: refuse a batch naming one that
    exists, or naming one twice."""
    existing = sorted({n for n in names if n in variables or n in datasets})
    twice = sorted({n for n, k in Counter(names).items() if k > 1} - set(existing))
    if not existing and not twice:
        return
    listed = ", ".join(repr(n) for n in (existing + twice)[:5]) + (" ..." if len(existing) + len(twice) > 5 else "")
    if len(existing) == 1 and not twice:
        what = f"a variable named {listed} exists already"
    elif existing and not twice:
        what = f"variables named {listed} exist already"
    else:
        what = f"names {listed} exist already or come twice in one batch"
    raise NameExistsError(f"{what}; variables are write-once: delete it first or choose another name")


def _end_of(index: SortedDict, prefix: str) -> int:
    """The position in the sorted ``index`` past every name starting with ``prefix``."""
    end = _past(prefix)
    return len(index) if end is None else index.bisect_left(end)


def _past(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound)."""
    stem = prefix.rstrip(chr(sys.maxunicode))
    return stem[:-1] + chr(ord(stem[-1]) + 1) if stem else None
