"""Reads that stay on the node: this worker's part of the directory, and the leases it grants.

The YellowPages pushes to every worker of a node the variables that node holds (name, var
id, type, block, offset) on the worker's stream, with no request on the read path.  A task
on this worker that gets such a name takes a **local lease** here, in process, with no RPC:
a count on the name's ``Grant``.  The YellowPages does not know these leases one by one.

Before it frees or moves a copy on this node, the YellowPages **recalls** the variable: on
this worker's event loop, under ``lock``, the grant is withdrawn (later gets of the name ask
the YellowPages) and its count of live local leases is sent back, on the same stream, as
leases the YellowPages now holds for this worker.  Each of those pins releases its lease
with the one-way message of any other lease when it dies; a pin whose grant was never
recalled only takes its count down.  Publications and recalls travel on one ordered stream,
so a publication sent before a recall never lands after it (``docs/protocols.md``).

The YellowPages evicts replicas least recently used, and local leases are reads it does not
see: each grant's first lease in a second is noted, and the notes go to it in one one-way
message from the event loop (``datafabric_used``), never on the read path: the read does
not even wake the loop (a wake hands the interpreter lock to the loop thread in the middle
of the task, tens of µs); the plugin sends the notes when the task ends, ahead of its result.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from datafabric.messages import LocalEntry
from datafabric.shm import Segment
from datafabric.types import FabricType, from_datashape
from datafabric.views import LocalState, _Pin

USE_REPORT_EVERY = 1.0  # seconds: a grant's reads are reported at most this often


class Grant:
    """One publication of one variable to this worker: the location, and how many live
    pins took a local lease under it.  ``recalled``: those leases are the YellowPages'."""

    __slots__ = (
        "var_id",
        "name",
        "segment",
        "data_offset",
        "extent_id",
        "ftype",
        "count",
        "recalled",
        "reported",
        "end",
    )

    def __init__(
        self, entry: LocalEntry, segment: Segment, ftype: FabricType, end: Callable[[Grant, dict], None]
    ) -> None:
        self.var_id = entry["var_id"]
        self.name = entry["name"]
        self.segment = segment  # mapped when published, on the event loop: not on the read path
        self.data_offset = entry["data_offset"]
        self.extent_id = entry["extent_id"]
        self.ftype = ftype
        self.count = 0
        self.recalled = False
        self.reported = -USE_REPORT_EVERY  # monotonic time of the last use reported
        self.end = functools.partial(end, self)  # what each pin's death calls: one per grant, not per pin


class LocalReads:
    """Per worker process.  ``send`` puts a message on the worker's stream from any thread
    (after whatever the event loop is doing now, so a release never overtakes the recall
    that reported its lease)."""

    def __init__(
        self,
        state: LocalState,
        node: str,
        holder: str,
        send: Callable[[dict], None],
        later: Callable[[Callable[..., None]], None],
    ) -> None:
        self.state = state
        self.node = node
        self.holder = holder
        self.send = send
        # Runs a report on the event loop later, from any thread, without waking the loop
        # from the read (the plugin runs it when the reading task ends, or within a second).
        self.later = later
        # Re-entrant: a pin's finalizer may run in the middle of any step of this thread
        # (a garbage collection), and takes the lock itself.  Each step is written so that
        # such a finalizer, run at any point of it, leaves the counts right.
        self.lock = threading.RLock()
        self._grants: dict[str, Grant] = {}  # by name: what a get here may lease locally
        self._by_id: dict[int, Grant] = {}
        self._types: dict[str, FabricType] = {}  # parsed once: a dataset's chunks share a few types
        self._used: list[int] = []  # var ids leased locally since the last report

    # -- from the YellowPages, on the event loop ---------------------------------------
    def publish(self, entries: list[LocalEntry]) -> None:
        """The blocks are mapped and the types parsed here, before the lock is taken (a
        pin's finalizer, run by a collection inside the state's lock, takes this lock: the
        two are never taken the other way round).  A name this process cannot map gets no
        grant: its gets ask the YellowPages."""
        resolved = []
        for entry in entries:
            segment = self.state.segment(self.node, entry["shm_id"])
            if segment is not None:
                resolved.append((entry, segment, self._type(entry["type"])))
        with self.lock:
            for entry, segment, ftype in resolved:
                if entry["var_id"] in self._by_id:
                    continue
                grant = Grant(
                    entry, segment, ftype, self._end
                )  # a name bound anew replaces its old grant, which a recall still finds
                self._grants[grant.name] = self._by_id[grant.var_id] = grant

    def recall(self, token: int, var_ids: list[int], reply: Callable[[dict], None]) -> None:
        """Stop answering these names here, and report the local leases still alive; the
        reply is sent before the lock is let go, so before any release of those leases."""
        leases = []
        with self.lock:
            for var_id in var_ids:
                grant = self._by_id.pop(var_id, None)
                if grant is None:
                    continue
                grant.recalled = True  # first: a pin ending from here on sends its release
                count = grant.count  # then: so every pin counted sends one, or was not counted
                if self._grants.get(grant.name) is grant:
                    del self._grants[grant.name]
                if count:
                    leases.append([var_id, count])
            reply({"op": "datafabric_recalled", "token": token, "leases": leases})

    # -- from tasks, any thread ---------------------------------------------------------
    def pin(self, name: str) -> _Pin | None:
        """A pin of ``name`` under a local lease, or None: not published here (ask the
        YellowPages), or recalled while this ran."""
        grant = self._grants.get(name)  # one dict read: atomic, and the hot path
        if grant is None or grant.segment.readonly is None:  # or its block was unmapped (the worker closing)
            return None
        now = time.monotonic()
        with self.lock:
            if grant.recalled:
                return None
            grant.count += 1
            first = self._note_use(grant, now)
        if first:
            self.later(self._report_use)
        lease = {"op": "datafabric_release", "var_id": grant.var_id, "holder": self.holder}
        try:
            return self.state.pin(
                name, self.node, grant.segment, grant.data_offset, grant.extent_id, grant.ftype, lease, grant.end
            )
        except BaseException:
            grant.end(lease)
            raise

    def pin_many(self, names: list[str]) -> list[_Pin | None]:
        """``[pin(n) for n in names]`` with one acquisition of the lock for the batch (a
        dataset's chunks, a get_many): the grants are counted together, then the pins made.
        Every count taken is held by a pin, or ended here if making the pins fails."""
        grants = self._grants
        found: list[Grant | None] = [grants.get(name) for name in names]
        now = time.monotonic()
        first = False
        with self.lock:  # no recall can run in here: undoing a part-way count is safe
            counted: list[Grant] = []
            try:
                for k, grant in enumerate(found):
                    if grant is None:
                        continue
                    if grant.recalled or grant.segment.readonly is None:
                        found[k] = None
                        continue
                    grant.count += 1
                    counted.append(grant)
                    first = self._note_use(grant, now) or first
            except BaseException:
                for grant in counted:
                    grant.count -= 1
                raise
        if first:
            self.later(self._report_use)
        return self._hold(names, found)

    def _hold(self, names: list[str], found: list[Grant | None]) -> list[_Pin | None]:
        """The pins of the counted grants in ``found``; made one by one, each held by its
        weak reference as soon as it exists, so a failure part way ends the counts of the
        pins not made yet and leaves the made ones to end as they die."""
        hold, node, holder = self.state.hold, self.node, self.holder
        out: list[_Pin | None] = [None] * len(found)
        k = 0
        try:
            for k, grant in enumerate(found):  # noqa: B007 (k is read after a failure)
                if grant is not None:
                    lease = {"op": "datafabric_release", "var_id": grant.var_id, "holder": holder}
                    out[k] = hold(
                        node, grant.segment, grant.data_offset, grant.extent_id, grant.ftype, lease, grant.end
                    )
        except BaseException:
            for j in range(k, len(found)):
                grant = found[j]
                if grant is not None and out[j] is None:
                    grant.end({"op": "datafabric_release", "var_id": grant.var_id, "holder": holder})
            raise
        made = [i for i, pin in enumerate(out) if pin is not None]
        self.state.cache([names[i] for i in made], [out[i] for i in made])  # type: ignore[misc]
        return out

    def _type(self, text: str) -> FabricType:
        ftype = self._types.get(text)  # parsed once: a dataset's chunks share a few types
        if ftype is None:
            ftype = self._types[text] = from_datashape(text)
        return ftype

    def _note_use(self, grant: Grant, now: float) -> bool:
        """Under the lock: note the grant's first lease in a second for the eviction
        order; True if it is the first note since the last report (schedule one)."""
        if now - grant.reported < USE_REPORT_EVERY:
            return False
        grant.reported = now
        first = not self._used
        self._used.append(grant.var_id)
        return first

    def _report_use(self, send: Callable[[dict], None] | None = None) -> None:
        """On the event loop.  ``send``: the loop's own, putting the note on the stream at
        once (ahead of the result of the task that read); by default ``self.send``."""
        with self.lock:
            used, self._used = self._used, []
        if used:
            (send or self.send)({"op": "datafabric_used", "var_ids": used})

    def _end(self, grant: Grant, lease: dict[str, Any]) -> None:
        """A pin under ``grant`` died (its finalizer, on whatever thread the GC ran)."""
        with self.lock:
            if not grant.recalled:
                grant.count -= 1
                return
        self.send(lease)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._grants)
