"""Deletes: a name disappears at once; its memory is freed when its last lease ends.

A variable still read when it is deleted has its headers marked DELETED first, so that a
directory rebuilt from the blocks after a crash frees it rather than listing it again.

``delete_many`` deletes a list of names, or every name under a prefix, in one request:
the marks go in one RPC per owner, the names leave the directory in one step (no
``await`` between the last check and the last delete), and the frees go in one RPC per
owner.  A name is deleted only once every variable of the request leased at that moment
has its headers marked: a lease taken while other marks were awaited sends the request
round again for that one.

``delete_chunks`` is the same bulk delete for a sealed dataset's chunk variables, which
only the dataset's delete may delete (``delete_many`` refuses their names).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datafabric.errors import NameNotFoundError
from datafabric.layout import ExtentState
from datafabric.names import CHUNK_PREFIX
from datafabric.protocol import EVENT_TOPIC
from yp.directory import Directory
from yp.reads import Reads
from yp.records import Variable

if TYPE_CHECKING:
    from yp.local_leases import LocalLeases
    from yp.owners import Owners


@dataclass
class Deletes:
    directory: Directory
    reads: Reads
    owners: Owners
    fabric_id: str
    local: LocalLeases

    async def delete(self, name: str) -> dict:
        while True:  # the name may be bound anew while its variable is recalled
            var = await self.reads.settled(name)
            async with self.local.withheld([var]):  # never published again: it is deleted below
                if self.directory.variables.get(name) is var:
                    return await self._delete(var)

    async def _delete(self, var: Variable) -> dict:
        """Every local lease of ``var`` is a lease here now."""
        if var.leases:
            await self.owners.mark_copies(ExtentState.DELETED, [var])
        freed = self.directory.delete(var)
        self._invalidate([var])
        await self.owners.free(freed)
        return {"freed": bool(freed)}

    async def delete_many(self, names: list[str] | None = None, prefix: str | None = None) -> dict:
        """Every one of ``names`` (all must exist: otherwise nothing is deleted), or every
        name starting with ``prefix`` now.  A name another caller deletes meanwhile counts
        as deleted."""
        if names is not None:
            names = list(dict.fromkeys(names))  # once: every round below looks them up again
            variables = self.directory.variables
            missing = [n for n in names if n.startswith(CHUNK_PREFIX) or n not in variables]  # is_chunk_name
            if missing:
                shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise NameNotFoundError(
                    f"no variable named {shown} ({len(missing)} of {len(names)}); nothing was deleted; "
                    "fabric.get_list() shows the names"
                )
        return await self._delete_many(names, prefix)

    async def delete_chunks(self, names: list[str]) -> dict:
        """A sealed dataset's chunk variables, those of ``names`` still known (a chunk lost
        with its block is gone already), as ``delete_many`` deletes: its delete calls this
        after the name and the record went."""
        return await self._delete_many(list(dict.fromkeys(names)), None)

    async def _delete_many(self, names: list[str] | None, prefix: str | None) -> dict:
        while True:  # a variable bound under the prefix while others were recalled goes round again
            targets = self._targets(names, prefix)
            async with self.local.withheld(targets):  # never published again: they are deleted below
                done = await self._delete_withheld(names, prefix, {v.var_id for v in targets})
            if done is not None:
                return done

    async def _delete_withheld(self, names: list[str] | None, prefix: str | None, withheld: set[int]) -> dict | None:
        """Every local lease of the withheld variables is a lease here now; None: a target
        appeared that was not withheld."""
        marked: set[int] = set()
        while True:
            variables = self._targets(names, prefix)
            if not {v.var_id for v in variables} <= withheld:
                return None
            blocks = {c.shm_id for v in variables for c in v.copies}
            if self.reads.moves.busy(blocks):
                await self.reads.moves.settled(lambda b=blocks: list(b))
                continue
            unmarked = [v for v in variables if v.leases and v.var_id not in marked]
            if not unmarked:
                break
            await self.owners.mark_copies(ExtentState.DELETED, unmarked)
            marked.update(v.var_id for v in unmarked)
        freed = self.directory.delete_all(variables)
        self._invalidate(variables)
        await self.owners.free(freed)
        return {"deleted": len(variables), "freed": len(freed)}

    def _targets(self, names: list[str] | None, prefix: str | None) -> list[Variable]:
        if names is None:
            return [self.directory.variables[n] for n in self.directory.names(prefix or "", hidden=CHUNK_PREFIX)]
        get = self.directory.variables.get  # names come deduplicated
        return [v for v in map(get, names) if v is not None]

    def _invalidate(self, variables: list[Variable]) -> None:
        """Processes holding views drop them from their caches (a later get asks again);
        one message per holder and one event for the clients."""
        per_holder: dict[str, list[int]] = defaultdict(list)
        for var in variables:
            for holder in self.directory.holders(var):
                per_holder[holder].append(var.var_id)
        for holder, var_ids in per_holder.items():
            self.owners.send(holder, {"op": "datafabric_invalidate", "var_ids": var_ids})
        msg = {"op": "datafabric_invalidate", "var_ids": [v.var_id for v in variables]}
        self.owners.scheduler.log_event(EVENT_TOPIC, {"fabric_id": self.fabric_id, **msg})
