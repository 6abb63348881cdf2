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
import struct
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


# A grant: one publication of one variable to this worker.  A worker holds one per name its
# node holds (a node of a million names, a million per worker), so a grant is bytes, a value
# Python's cyclic garbage collector never tracks, and so are the dicts holding them (their
# keys and values are all untracked: CPython does not track such a dict).  A tuple per grant
# made the dicts tracked, and every full collection of the worker walked a million entries: a
# long insert_many slowed as the node filled.  The bytes are the fields of ``_FIELDS`` (the
# grant's serial, its var id, data offset and extent id, and the indexes of its block and of
# its type in ``LocalReads._blocks`` and ``_types``), then its name in UTF-8.  Its count of
# live local leases is ``LocalReads._counts[serial]``, there exactly while the grant is not
# recalled; the serial, this worker's own number of the publication, tells a variable
# published again after a recall from the grant recalled.
Grant = bytes
_FIELDS = struct.Struct("=qqQQII")
_unpack = _FIELDS.unpack_from  # (serial, var_id, data_offset, extent_id, block, type) of a grant


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
        # Per grant, only dicts of plain values (see ``Grant``): the collector walks none of them.
        self._grants: dict[str, Grant] = {}  # by name: what a get here may lease locally
        self._by_id: dict[int, Grant] = {}
        self._serials = itertools.count()
        self._counts: dict[int, int] = {}  # by serial: live local leases of a grant not recalled
        self._reported: dict[int, float] = {}  # by serial: monotonic time of the last use reported
        # Per block and per type, a few: what a grant's indexes name.
        self._blocks: list[Segment] = []  # the blocks of the grants, mapped when published
        self._block_index: dict[str, int] = {}  # by shm id
        self._types: list[tuple[FabricType, dict, np.dtype | None]] = []  # ``_type``
        self._type_index: dict[str, int] = {}  # by type text
        # by serial, for the newest grants (at most ``READY``): a pin with no lease yet and its
        # first view (``_make_ready``); only grants not recalled have one
        self._ready: dict[int, tuple[_Pin, np.ndarray]] = {}
        self._used: list[int] = []  # var ids leased locally since the last report
        self._report = self._report_use  # bound once: a task's first get hands it to ``later``
        self._ended = self._end  # and this to each pin, bound to its grant's serial

    # -- from the YellowPages, on the event loop ---------------------------------------
    def publish(self, entries: list[LocalEntry]) -> None:
        """The blocks are mapped and the types parsed here, before the lock is taken (a
        pin's finalizer, run by a collection inside the state's lock, takes this lock: the
        two are never taken the other way round).  A name this process cannot map gets no
        grant: its gets ask the YellowPages."""
        resolved = []
        for entry in entries:
            block = self._block(entry["shm_id"])
            if block is not None:
                fields = (entry["var_id"], entry["data_offset"], entry["extent_id"], block, self._type(entry["type"]))
                resolved.append((entry["name"], fields))
        fresh = []
        with self.lock:
            for name, fields in resolved:
                var_id = fields[0]
                if var_id in self._by_id:
                    continue
                serial = next(self._serials)
                grant = _FIELDS.pack(serial, *fields) + name.encode()
                # a name bound anew replaces its old grant, which a recall still finds by id
                self._grants[name] = self._by_id[var_id] = grant
                self._counts[serial] = 0
                fresh.append((serial, *fields))
        self._make_ready(fresh[-READY:])

    def _make_ready(self, fresh: list[tuple]) -> None:
        """The first views of the newest grants (their unpacked fields), made ahead here on
        the event loop: a task's first get of a name just published takes one and makes no
        array, its dearest step while the interpreter runs cold (a producer's result, read
        by the next task, is the common case).  A ready pin holds no lease and has no
        finalizer: a get counts the lease under the lock as it takes the pin (``view``), and
        a recall drops it with its grant.  Made outside the lock (making arrays may collect
        a pin, whose finalizer takes it); it enters the table only if its grant is still
        there.  At most ``READY`` of them, tracked objects that a full collection walks."""
        made = []
        for serial, var_id, data_offset, extent_id, block, type_ in fresh:
            segment = self._blocks[block]
            if segment.readonly is None:
                continue
            lease = {"op": "datafabric_release", "var_id": var_id, "holder": self.holder}
            pin = self._make_pin(segment, data_offset, extent_id, type_, lease)
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
                serial = _unpack(grant)[0]
                count = self._counts.pop(serial)
                self._reported.pop(serial, None)
                self._ready.pop(serial, None)
                name = grant[_FIELDS.size :].decode()
                if self._grants.get(name) is grant:
                    del self._grants[name]
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
        serial, var_id, _, _, block, _ = _unpack(grant)
        ready = None
        if serial in self._ready and self._blocks[block].readonly is not None:  # a peek
            now = time.monotonic()
            with self.lock:
                ready = self._ready.pop(serial, None)
                if ready is not None:  # so not recalled: its count is there
                    if now - self._reported.get(serial, -USE_REPORT_EVERY) >= USE_REPORT_EVERY:
                        self._note_use(serial, var_id, now)
                    self._counts[serial] += 1  # the last step that may fail: none leaves a count
        if ready is None:  # none made ahead, or taken by another thread, or recalled meanwhile
            pin = self.pin(name)
            return None if pin is None else pin.view()
        pin, view = ready
        try:  # from the count on, every step that may fail ends it on failure
            self.state.take(name, pin, MethodType(self._ended, serial), since)
        except BaseException:
            self._end(serial, pin.lease)
            raise
        return view

    def pin(self, name: str) -> _Pin | None:
        """A pin of ``name`` under a local lease, or None: not published here (ask the
        YellowPages), or recalled while this ran.  A task's first get: few steps."""
        since = self.state.epoch  # before the count: an invalidation after it keeps the pin uncached
        grant = self._grants.get(name)  # one dict read: atomic, and the hot path
        if grant is None:
            return None
        serial, var_id, data_offset, extent_id, block, type_ = _unpack(grant)
        segment = self._blocks[block]
        if segment.readonly is None:  # its block was unmapped (the worker closing)
            return None
        now = time.monotonic()
        with self.lock:
            count = self._counts.get(serial)
            if count is None:  # recalled
                return None
            if now - self._reported.get(serial, -USE_REPORT_EVERY) >= USE_REPORT_EVERY:  # ``_note_use``, inline
                self._reported[serial] = now
                if not self._used:  # scheduled with the note, under the lock (``_note_use``)
                    self.later(self._report)
                self._used.append(var_id)
            self._counts[serial] = count + 1  # the last step that may fail: none leaves a count
        try:  # from the count on, every step that may fail ends it on failure
            lease = {"op": "datafabric_release", "var_id": var_id, "holder": self.holder}
            # end(lease) is self._end(serial, lease): one object, the lightest
            end = MethodType(self._ended, serial)
            ftype, interface, cast = self._types[type_]
            interface = interface.copy()  # the type's, at this grant's address (a copy: half a {**...})
            interface["data"] = (segment.address + data_offset, True)
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
            self._end(serial, {"op": "datafabric_release", "var_id": var_id, "holder": self.holder})
            raise

    def pin_many(self, names: list[str]) -> list[_Pin | None]:
        """``[pin(n) for n in names]`` with one acquisition of the lock for the batch (a
        dataset's chunks, a get_many): the grants are counted together, then the pins made.
        Every count taken is held by a pin, or ended here if making the pins fails."""
        since = self.state.epoch  # before the counts: the pins are cached only if no invalidation came since
        grants, blocks = self._grants, self._blocks
        found: list[tuple | None] = [None if (g := grants.get(name)) is None else _unpack(g) for name in names]
        now = time.monotonic()
        with self.lock:  # no recall can run in here: undoing a part-way count is safe
            counts, reported = self._counts, self._reported
            counted: list[int] = []
            try:
                for k, fields in enumerate(found):
                    if fields is None:
                        continue
                    serial = fields[0]
                    if serial not in counts or blocks[fields[4]].readonly is None:
                        found[k] = None
                        continue
                    counts[serial] += 1
                    counted.append(serial)
                    if now - reported.get(serial, -USE_REPORT_EVERY) >= USE_REPORT_EVERY:
                        self._note_use(serial, fields[1], now)
            except BaseException:
                for serial in counted:
                    counts[serial] -= 1
                raise
        return self._hold(names, found, since)

    def _hold(self, names: list[str], found: list[tuple | None], since: int) -> list[_Pin | None]:
        """The pins of the counted grants in ``found`` (their unpacked fields); made one by
        one, each held by its weak reference as soon as it exists, so a failure part way
        ends the counts of the pins not made yet and leaves the made ones to end as they die."""
        hold, node, holder, end = self.state.hold, self.node, self.holder, self._ended
        blocks, types = self._blocks, self._types
        out: list[_Pin | None] = [None] * len(found)
        k = 0
        try:
            for k, fields in enumerate(found):  # noqa: B007 (k is read after a failure)
                if fields is not None:
                    serial, var_id, data_offset, extent_id, block, type_ = fields
                    lease = {"op": "datafabric_release", "var_id": var_id, "holder": holder}
                    ending = MethodType(end, serial)
                    ftype, interface, cast = types[type_]
                    segment = blocks[block]
                    interface = interface.copy()
                    interface["data"] = (segment.address + data_offset, True)
                    out[k] = hold(node, segment, data_offset, extent_id, ftype, lease, ending, (interface, cast))
        except BaseException:
            for j in range(k, len(found)):
                fields = found[j]
                if fields is not None and out[j] is None:
                    end(fields[0], {"op": "datafabric_release", "var_id": fields[1], "holder": holder})
            raise
        made = [i for i, pin in enumerate(out) if pin is not None]
        self.state.cache([names[i] for i in made], [out[i] for i in made], since)  # type: ignore[misc]
        return out

    def _make_pin(self, segment: Segment, data_offset: int, extent_id: int, type_: int, lease: dict) -> _Pin:
        """A pin of a grant's variable holding no lease yet (``_make_ready``)."""
        ftype, interface, cast = self._types[type_]
        interface = interface.copy()
        interface["data"] = (segment.address + data_offset, True)
        return _Pin(segment, self.node, data_offset, extent_id, ftype, lease, (interface, cast))

    def _block(self, shm_id: str) -> int | None:
        """The index of the block ``shm_id`` in ``_blocks``, mapped now (its latest
        mapping serves every grant in it), or None if this process cannot map it."""
        segment = self.state.segment(self.node, shm_id)
        if segment is None:
            return None
        index = self._block_index.get(shm_id)
        if index is None:  # appended before its index is known: a pin never finds it missing
            self._blocks.append(segment)
            index = self._block_index[shm_id] = len(self._blocks) - 1
        else:
            self._blocks[index] = segment
        return index

    def _type(self, text: str) -> int:
        """The index in ``_types`` of the type ``text``: the type, its pins' array
        interface with no address yet and their cast (``interface_of``), parsed once: a
        dataset's chunks share a few types."""
        index = self._type_index.get(text)
        if index is None:
            ftype = from_datashape(text)
            self._types.append((ftype, *interface_of(0, ftype)))
            index = self._type_index[text] = len(self._types) - 1
        return index

    def _note_use(self, serial: int, var_id: int, now: float) -> None:
        """Under the lock, for a grant whose last report is a second old or more: note
        its lease for the eviction order, and schedule a report if it is the first note
        since the last.  Scheduled under the lock, with the note: scheduled after it, a
        note another thread made meanwhile (not the first) found no report due at the end
        of its own task, whose result then went ahead of the note."""
        self._reported[serial] = now
        if not self._used:
            self.later(self._report)
        self._used.append(var_id)

    def _report_use(self, send: Callable[[dict], None] | None = None) -> None:
        """On the event loop.  ``send``: the loop's own, putting the note on the stream at
        once (ahead of the result of the task that read); by default ``self.send``."""
        with self.lock:
            used, self._used = self._used, []
        if used:
            (send or self.send)({"op": "datafabric_used", "var_ids": used})

    def _end(self, serial: int, lease: dict[str, Any]) -> None:
        """A pin under the grant ``serial`` died (its finalizer, on whatever thread the GC
        ran): its count goes down, or, once the grant is recalled, its lease is the
        YellowPages'."""
        with self.lock:
            count = self._counts.get(serial)
            if count is not None:
                self._counts[serial] = count - 1
                return
        self.send(lease)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._grants)
