"""Reservations of writers that left the scheduler while they may still be writing.

Leaving is not dying.  A client whose stream broke is removed (``remove_client``) and
reconnects with the same id; a worker removed for missed heartbeats keeps running its
task until its close waits it out.  Such a process goes on copying into the reservations
it maps (a ``create``'s ``Creation.array``, an insert's copy).  Freed at its departure,
that memory would go to the next variable placed there and take the late copy's bytes.

So who decides that a writer is gone is not the scheduler but the block's owner, a
process of the block's machine: a reservation of a departed holder whose writer may map
the block (``Pending.writer``: the process it named, when the block is on its node) is
kept, counted as used and RESERVED (so no placement, compaction or adoption reuses or
moves it), until one of:

- the block's owner proves that process gone (``datafabric/processes.py``: pid and start
  time from ``/proc/<pid>/stat``, or another machine); asked every ``INTERVAL`` s at
  first, backing off to ``LONGEST`` while nothing changes;
- the writer, alive and reconnected, seals it (the reservation is still its own: the seal
  works) or aborts it (it writes no more);
- the block goes (a node's last worker unlinks it: nobody else is given that memory).

A reservation is dropped only if the directory still holds that very entry after the
owner's answer, so a seal or abort meanwhile wins.  A writer that cannot map the block
sends its bytes through the owner's ``write``, which lands only in a RESERVED extent with
the id the writer was given: its reservation ends at its departure, as before.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from yp.directory import Directory
from yp.owners import Owners
from yp.records import Pending

INTERVAL = 0.5  # seconds between the first checks of a departure
LONGEST = 8.0  # between checks of writers found alive again and again


class DepartedWriters:
    def __init__(self, directory: Directory, owners: Owners) -> None:
        self.directory = directory
        self.owners = owners
        self._watch: asyncio.Task | None = None
        self._delay = INTERVAL

    def wake(self) -> None:
        """A holder left (on the scheduler's loop): watch its reservations, if any stayed."""
        if not self.directory.stranded():
            return
        self._delay = INTERVAL
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self.directory.stranded():
            await asyncio.sleep(self._delay)
            if not await self.check():
                self._delay = min(2 * self._delay, LONGEST)

    async def check(self) -> int:
        """Ask each owner about the writers of its blocks' departed reservations; give back
        those whose writer is gone.  Returns how many were given back."""
        per_owner: dict[str, list[tuple[tuple[str, int], Pending]]] = defaultdict(list)
        for key, entry in self.directory.stranded():
            if (owner := self.owners.owner_of(key[0])) is not None:  # orphaned: its adopter keeps it
                per_owner[owner].append((key, entry))
        calls = [(w, "processes_gone", {"processes": [e.writer for _, e in held]}) for w, held in per_owner.items()]
        answers = await self.owners.ask_each(calls, "departed writers")
        freed = []
        for held, answer in zip(per_owner.values(), answers, strict=True):
            if isinstance(answer, BaseException):
                continue  # asked again next time
            for (key, entry), gone in zip(held, answer, strict=True):
                if gone and self.directory.pending.get(key) is entry and (copy := self.directory.drop_pending(*key)):
                    freed.append(copy)
        await self.owners.free(freed)
        return len(freed)

    def stop(self) -> None:
        """The fabric shut down: nothing is watched any more."""
        if self._watch is not None:
            self._watch.cancel()
