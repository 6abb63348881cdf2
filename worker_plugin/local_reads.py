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

import itertools
import threading
import time
from collections.abc import Callable
from types import MethodType
from typing import Any

import numpy as np

from datafabric.messages import LocalEntry
from datafabric.shm import Segment
from datafabric.types import FabricType, from_datashape
from datafabric.views import LocalState, _Pin, interface_of

USE_REPORT_EVERY = 1.0  # seconds: a grant's reads are reported at most this often
READY = 256  # the newest grants whose first view is made ahead (``_make_ready``)


# A grant: one publication of one variable to this worker, as a tuple of plain values
# (serial, var_id, name, shm_id, data_offset, extent_id, type text) that the garbage collector stops
# tracking (a tuple holding a dict never is untracked: its pins' array interface is kept
# apart, in ``LocalReads._interfaces``).  A worker holds one per name its node holds (a writer
# of 200,000 names, 200,000 of them): objects it tracked would make every full collection
# walk them all, and a long insert_many slow down as it grows.  Its count of live local
# leases is ``LocalReads._counts[serial]``, there exactly while the grant is not recalled;
# the serial, this worker's own number of the publication, tells a variable published
# again after a recall from the grant recalled.
Grant = tuple[int, int, str, str, int, int, str]
_SERIAL, _VAR_ID, _NAME, _SHM_ID = 0, 1, 2, 3


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
        self._serials = itertools.count()
        self._counts: dict[int, int] = {}  # by serial: live local leases of a grant not recalled
        self._reported: dict[int, float] = {}  # by serial: monotonic time of the last use reported
        self._interfaces: dict[int, dict] = {}  # by serial: the pins' array interface (``interface_of``)
        self._segments: dict[str, Segment] = {}  # the blocks of the grants, mapped when published
        self._types: dict[str, tuple[FabricType, np.dtype | None]] = {}  # by type text: ``_type``
        # by serial, for the newest grants: a pin with no lease yet and its first view
        # (``_make_ready``); only grants not recalled have one
        self._ready: dict[int, tuple[_Pin, np.ndarray]] = {}
        self._used: list[int] = []  # var ids leased locally since the last report
        self._report = self._report_use  # bound once: a task's first get hands it to ``later``
        self._ended = self._end  # and this to each pin, bound to its grant

    # -- from the YellowPages, on the event loop ---------------------------------------
    def publish(self, entries: list[LocalEntry]) -> None:
        """The blocks are mapped, the types parsed and the pins' array interfaces made
        here, before the lock is taken (a pin's finalizer, run by a collection inside the
        state's lock, takes this lock: the two are never taken the other way round).  A
        name this process cannot map gets no grant: its gets ask the YellowPages."""
        resolved = []
        for entry in entries:
            shm_id = entry["shm_id"]
            segment = self.state.segment(self.node, shm_id)
            if segment is not None:
                self._segments[shm_id] = segment
                text, offset = entry["type"], entry["data_offset"]
                interface, _ = interface_of(segment.address + offset, self._type(text)[0])
                resolved.append((interface, (entry["var_id"], entry["name"], shm_id, offset, entry["extent_id"], text)))
        fresh = []
        with self.lock:
            for interface, (var_id, *rest) in resolved:
                if var_id in self._by_id:
                    continue
                serial = next(self._serials)
                grant = (serial, var_id, *rest)
                # a name bound anew replaces its old grant, which a recall still finds by id
                self._grants[grant[_NAME]] = self._by_id[var_id] = grant  # type: ignore[assignment]
                self._counts[serial] = 0
                self._interfaces[serial] = interface
                fresh.append((grant, interface))
        self._make_ready(fresh[-READY:])

    def _make_ready(self, fresh: list[tuple[Grant, dict]]) -> None:
        """The first views of the newest grants, made ahead here on the event loop: a
        task's first get of a name just published takes one and makes no array, its
        dearest step while the interpreter runs cold (a producer's result, read by the
        next task, is the common case).  A ready pin holds no lease and has no finalizer:
        a get counts the lease under the lock as it takes the pin (``view``), and a recall
        drops it with its grant.  Made outside the lock (making arrays may collect a pin,
        whose finalizer takes it); recalls run on this loop too, so none comes between."""
        made = []
        for grant, interface in fresh:
            serial, var_id, _, shm_id, data_offset, extent_id, text = grant
            segment = self._segments[shm_id]
            if segment.readonly is None:
                continue
            ftype, cast = self._types[text]
            lease = {"op": "datafabric_release", "var_id": var_id, "holder": self.holder}
            pin = _Pin(segment, self.node, data_offset, extent_id, ftype, lease, (interface, cast))
            made.append((serial, pin, pin.view()))
        dropped = []
        with self.lock:
            for serial, pin, view in made:
                if serial in self._counts:
                    self._ready[serial] = (pin, view)
            while len(self._ready) > READY:
                dropped.append(self._ready.pop(next(iter(self._ready))))
        del dropped  # they die here, outside the lock

    def close(self) -> None:
        """At the plugin's teardown: the ready pins let go of their blocks' mappings."""
        with self.lock:
            ready, self._ready = self._ready, {}
        del ready

    def recall(self, token: int, var_ids: list[int], reply: Callable[[dict], None]) -> None:
        """Stop answering these names here, and report the local leases still alive; the
        reply is sent before the lock is let go, so before any release of those leases."""
        leases = []
        with self.lock:
            for var_id in var_ids:
                grant = self._by_id.pop(var_id, None)
                if grant is None:
                    continue
                # One step: a pin ending from here on finds no count and sends its release;
                # every pin counted so far sends one, or was not counted.
                count = self._counts.pop(grant[_SERIAL])
                self._reported.pop(grant[_SERIAL], None)
                self._ready.pop(grant[_SERIAL], None)
                del self._interfaces[grant[_SERIAL]]
                if self._grants.get(grant[_NAME]) is grant:
                    del self._grants[grant[_NAME]]
                if count:
                    leases.append([var_id, count])
            reply({"op": "datafabric_recalled", "token": token, "leases": leases})

    # -- from tasks, any thread ---------------------------------------------------------
    def view(self, name: str) -> np.ndarray | None:
        """``pin(name).view()``, or None as ``pin`` says: a task's get.  A first view made
        ahead (``_make_ready``) is taken under the lock with the count of its lease, so a
        recall finds either the ready pin (and drops it) or its lease counted."""
        since = self.state.epoch  # before the count: an invalidation after it keeps the pin uncached
        grant = self._grants.get(name)  # one dict read: atomic, and the hot path
        if grant is None:
            return None
        serial = grant[_SERIAL]
        ready = None
        first = False
        if serial in self._ready and self._segments[grant[_SHM_ID]].readonly is not None:  # a peek
            now = time.monotonic()
            with self.lock:
                ready = self._ready.pop(serial, None)
                if ready is not None:  # so not recalled: its count is there
                    if now - self._reported.get(serial, -USE_REPORT_EVERY) >= USE_REPORT_EVERY:
                        first = self._note_use(grant, now)
                    self._counts[serial] += 1  # the last step that may fail: none leaves a count
        if ready is None:  # none made ahead, or taken by another thread, or recalled meanwhile
            pin = self.pin(name)
            return None if pin is None else pin.view()
        pin, view = ready
        try:  # from the count on, every step that may fail ends it on failure
            if first:
                self.later(self._report)
            self.state.take(name, pin, MethodType(self._ended, grant), since)
        except BaseException:
            self._end(grant, pin.lease)
            raise
        return view

    def pin(self, name: str) -> _Pin | None:
        """A pin of ``name`` under a local lease, or None: not published here (ask the
        YellowPages), or recalled while this ran.  A task's first get: few steps."""
        since = self.state.epoch  # before the count: an invalidation after it keeps the pin uncached
        grant = self._grants.get(name)  # one dict read: atomic, and the hot path
        if grant is None:
            return None
        serial, var_id, _, shm_id, data_offset, extent_id, text = grant
        segment = self._segments[shm_id]
        if segment.readonly is None:  # its block was unmapped (the worker closing)
            return None
        now = time.monotonic()
        with self.lock:
            count = self._counts.get(serial)
            if count is None:  # recalled
                return None
            interface = self._interfaces[serial]  # under the lock: a recall drops it
            first = False
            if now - self._reported.get(serial, -USE_REPORT_EVERY) >= USE_REPORT_EVERY:  # ``_note_use``, inline
                self._reported[serial] = now
                first = not self._used
                self._used.append(var_id)
            self._counts[serial] = count + 1  # the last step that may fail: none leaves a count
        try:  # from the count on, every step that may fail ends it on failure
            if first:
                self.later(self._report)
            lease = {"op": "datafabric_release", "var_id": var_id, "holder": self.holder}
            # end(lease) is self._end(grant, lease): one object, the lightest
            end = MethodType(self._ended, grant)
            ftype, cast = self._types[text]
            return self.state.pin(
                name,
                self.node,
                segment,
                data_offset,
                extent_id,
                ftype,
                lease,
                end,
                since=since,
                interface=(interface, cast),
            )
        except BaseException:
            self._end(grant, {"op": "datafabric_release", "var_id": var_id, "holder": self.holder})
            raise

    def pin_many(self, names: list[str]) -> list[_Pin | None]:
        """``[pin(n) for n in names]`` with one acquisition of the lock for the batch (a
        dataset's chunks, a get_many): the grants are counted together, then the pins made.
        Every count taken is held by a pin, or ended here if making the pins fails."""
        since = self.state.epoch  # before the counts: the pins are cached only if no invalidation came since
        grants, segments = self._grants, self._segments
        found: list[Grant | None] = [grants.get(name) for name in names]
        faces: list[dict | None] = [None] * len(found)  # the counted grants' array interfaces
        now = time.monotonic()
        first = False
        with self.lock:  # no recall can run in here: undoing a part-way count is safe
            counts, reported, interfaces = self._counts, self._reported, self._interfaces
            counted: list[int] = []
            try:
                for k, grant in enumerate(found):
                    if grant is None:
                        continue
                    serial = grant[_SERIAL]
                    if serial not in counts or segments[grant[_SHM_ID]].readonly is None:
                        found[k] = None
                        continue
                    counts[serial] += 1
                    counted.append(serial)
                    faces[k] = interfaces[serial]  # under the lock: a recall drops it
                    if now - reported.get(serial, -USE_REPORT_EVERY) >= USE_REPORT_EVERY:
                        first = self._note_use(grant, now) or first
            except BaseException:
                for serial in counted:
                    counts[serial] -= 1
                raise
        out = self._hold(names, found, faces, since)
        if first:  # after the pins hold the counts: a failure here ends them as the pins die
            self.later(self._report)
        return out

    def _hold(
        self, names: list[str], found: list[Grant | None], faces: list[dict | None], since: int
    ) -> list[_Pin | None]:
        """The pins of the counted grants in ``found``; made one by one, each held by its
        weak reference as soon as it exists, so a failure part way ends the counts of the
        pins not made yet and leaves the made ones to end as they die."""
        hold, node, holder, end = self.state.hold, self.node, self.holder, self._ended
        segments, types = self._segments, self._types
        out: list[_Pin | None] = [None] * len(found)
        k = 0
        try:
            for k, grant in enumerate(found):  # noqa: B007 (k is read after a failure)
                if grant is not None:
                    _, var_id, _, shm_id, data_offset, extent_id, text = grant
                    lease = {"op": "datafabric_release", "var_id": var_id, "holder": holder}
                    ending = MethodType(end, grant)
                    ftype, cast = types[text]
                    out[k] = hold(
                        node, segments[shm_id], data_offset, extent_id, ftype, lease, ending, (faces[k], cast)
                    )
        except BaseException:
            for j in range(k, len(found)):
                grant = found[j]
                if grant is not None and out[j] is None:
                    end(grant, {"op": "datafabric_release", "var_id": grant[_VAR_ID], "holder": holder})
            raise
        made = [i for i, pin in enumerate(out) if pin is not None]
        self.state.cache([names[i] for i in made], [out[i] for i in made], since)  # type: ignore[misc]
        return out

    def _type(self, text: str) -> tuple[FabricType, np.dtype | None]:
        """The type and its pins' cast (``interface_of``), parsed once: a dataset's chunks
        share a few types.  Kept apart from the grants: a dtype is an object the garbage
        collector may track, and a tuple holding one stays tracked."""
        known = self._types.get(text)
        if known is None:
            ftype = from_datashape(text)
            known = self._types[text] = (ftype, interface_of(0, ftype)[1])
        return known

    def _note_use(self, grant: Grant, now: float) -> bool:
        """Under the lock, for a grant whose last report is a second old or more: note
        its lease for the eviction order; True if it is the first note since the last
        report (schedule one)."""
        self._reported[grant[_SERIAL]] = now
        first = not self._used
        self._used.append(grant[_VAR_ID])
        return first

    def _report_use(self, send: Callable[[dict], None] | None = None) -> None:
        """On the event loop.  ``send``: the loop's own, putting the note on the stream at
        once (ahead of the result of the task that read); by default ``self.send``."""
        with self.lock:
            used, self._used = self._used, []
        if used:
            (send or self.send)({"op": "datafabric_used", "var_ids": used})

    def _end(self, grant: Grant, lease: dict[str, Any]) -> None:
        """A pin under ``grant`` died (its finalizer, on whatever thread the GC ran): its
        count goes down, or, once the grant is recalled, its lease is the YellowPages'."""
        serial = grant[_SERIAL]
        with self.lock:
            count = self._counts.get(serial)
            if count is not None:
                self._counts[serial] = count - 1
                return
        self.send(lease)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._grants)
