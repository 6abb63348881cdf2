"""The ``Fabric`` calls on many names at once: a page of the listing, and deletes in bulk.

Each is one round trip, and its cost on the scheduler grows with the names it returns or
deletes, not with the names the directory holds (the directory keeps its names sorted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from datafabric import arguments
from datafabric.errors import InvalidArgumentError
from datafabric.names import validate_name

if TYPE_CHECKING:
    from datafabric.context import Context
    from datafabric.views import LocalState


class Catalog:
    """Mixed into ``Fabric``, which provides ``_ctx()`` (the calling process's way to the
    fabric) and ``_state`` (its cached views)."""

    _ctx: Callable[[], Context]
    _state: LocalState

    def get_list(self, prefix: str = "", limit: int | None = None, after: str | None = None) -> list[str]:
        """Sorted names starting with ``prefix``: at most ``limit`` of them, and only those
        after ``after``, so ``get_list(p, 1000, after=page[-1])`` is the next page.  A page
        costs the scheduler O(log n + limit), however many names it holds."""
        prefix = arguments.text(prefix, "prefix")
        limit = None if limit is None else arguments.whole(limit, "limit")
        after = None if after is None else arguments.text(after, "after")
        return list(self._ctx().call("names", prefix=prefix, limit=limit, after=after))

    def delete_many(self, names: Iterable[str]) -> int:
        """``delete`` of every one of ``names`` in one round trip; all of them must exist,
        or nothing is deleted.  Returns how many were deleted."""
        if isinstance(names, str | bytes) or not isinstance(names, Iterable):
            raise arguments.refuse("names", names, "an iterable of names (a list, not one str)")
        names = [validate_name(n) for n in names]
        deleted = self._ctx().call("delete_many", names=names)["deleted"]
        for name in names:
            self._state.forget(name)
        return deleted

    def delete_prefix(self, prefix: str) -> int:
        """``delete`` of every name that starts with ``prefix`` now, in one round trip;
        returns how many were deleted.  An empty prefix is refused."""
        if not arguments.text(prefix, "prefix"):
            raise InvalidArgumentError(
                "delete_prefix needs a non-empty prefix (an empty one would delete every name); "
                "pass the names to delete_many, or call fabric.shutdown()"
            )
        deleted = self._ctx().call("delete_many", prefix=prefix)["deleted"]
        self._state.forget_prefix(prefix)
        return deleted
