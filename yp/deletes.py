"""Deletes: a name disappears at once; its memory is freed when its last lease ends.

A variable still read when it is deleted has its headers marked DELETED first, so that a
directory rebuilt from the blocks after a crash frees it rather than listing it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from datafabric.layout import ExtentState
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
            await self.owners.mark_copies(ExtentState.DELETED, var)
        freed = self.directory.delete(var)
        msg = {"op": "datafabric_invalidate", "var_ids": [var.var_id]}
        for holder in self.directory.holders(var):  # they drop their cached view; a later get asks again
            self.owners.send(holder, msg)
        self.owners.scheduler.log_event(EVENT_TOPIC, {"fabric_id": self.fabric_id, **msg})
        await self.owners.free(freed)
        return {"freed": bool(freed)}
