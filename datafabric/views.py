"""What one process holds of the fabric: attached blocks, and the leases behind its views.

Every array ``get`` returns has a ``_Pin`` as its numpy ``.base`` (numpy collapses view
chains onto the first non-ndarray base, so slices and reshapes share it too).  The pin
holds the block's read-only buffer (one per block, ``Segment.readonly``), which keeps the
mapping alive, and the lease: when the last view of a pin is collected, a finalizer sends
the release to the YellowPages without waiting.  The pin is cached by name so that later gets in this
process cost no RPC while any view is alive; the YellowPages invalidates the cache when
the name is deleted.  A lease is taken before its pin is cached, and the invalidation of a
variable deleted in between may arrive first: so every invalidation advances ``epoch``,
each get reads it before it takes its lease, and a pin is cached only if no invalidation
came since (a name deleted and bound anew is never answered with the deleted variable).
"""

from __future__ import annotations

import functools
import threading
import uuid
import weakref
from collections.abc import Callable

import numpy as np

from datafabric import layout
from datafabric.references import FabricView
from datafabric.shm import Segment
from datafabric.types import FabricType


class _Pin:
    """``lease`` is the release message its finalizer sends; a lease declared again after
    a scheduler restart changes its ``var_id`` in place.  ``extent_id`` is the id in the
    header of the extent it views: declared after a restart with its location, it tells
    the variable it views from one placed there since.  Small on purpose (a get_many
    makes thousands): the block's read-only buffer, shared by every pin of the block,
    keeps the mapping alive.  ``__array_interface__`` is a plain value (``interface_of``; a
    local grant makes it from its type's, parsed once per type), which numpy reads without
    running any Python: a task's first get is mostly the interpreter running cold, every
    step counts."""

    __slots__ = (
        "_mem",
        "segment",
        "node",
        "data_offset",
        "extent_id",
        "lease",
        "ftype",
        "__array_interface__",
        "_cast",
        "_last",
        "__weakref__",
    )

    def __init__(
        self,
        segment: Segment,
        node: str,
        data_offset: int,
        extent_id: int,
        ftype: FabricType,
        lease: dict,
        interface: tuple[dict, np.dtype | None] | None = None,
    ) -> None:
        mem = segment.readonly
        if mem is None:
            raise ValueError(f"block {segment.name} was unmapped")  # as a released buffer would say
        self._mem = mem
        self.segment = segment
        self.node = node
        self.data_offset = data_offset
        self.extent_id = extent_id
        self.lease = lease
        self.ftype = ftype
        self.__array_interface__, self._cast = interface or interface_of(segment.address + data_offset, ftype)
        self._last: weakref.ref[np.ndarray] | None = None

    @property
    def var_id(self) -> int:
        return self.lease["var_id"]

    def view(self) -> np.ndarray:
        """A new view; made from a live earlier one when there is one (a fifth of the
        cost of going through ``__array_interface__`` again).  The pin's first view is
        handed out as made (a user may reshape it in place, so it is never the model of
        later ones): most pins only ever make one, and it costs an array fewer."""
        last = self._last() if self._last is not None else None
        if last is not None:
            return last.view()
        cast = self._cast
        fresh = np.asarray(self).view(FabricView) if cast is None else np.asarray(self).view(cast, FabricView)
        if self._last is None:
            self._last = _GONE  # dead: the next view makes the model
            return fresh
        self._last = weakref.ref(fresh)
        return fresh.view()


class _Nothing:
    pass


_GONE: weakref.ref = weakref.ref(_Nothing())  # a weak reference whose referent is gone


def interface_of(address: int, ftype: FabricType) -> tuple[dict, np.dtype | None]:
    """What a pin of the variable at ``address`` makes its arrays from: its array
    interface (only ints, strings and tuples of them: the same for every variable of the
    type but for ``data``), and the dtype to view the array as once numpy has read it
    (None: none needed, the cheaper first view)."""
    typestr, cast = _typestr(ftype.dtype)
    return {"version": 3, "shape": ftype.shape, "typestr": typestr, "data": (address, True)}, cast


@functools.lru_cache(maxsize=256)
def _typestr(dtype: np.dtype) -> tuple[str, np.dtype | None]:
    """The array interface's name of ``dtype`` when numpy reads it back as an equal dtype
    (a scalar type: no view to the dtype afterwards); else raw bytes, viewed as ``dtype``
    afterwards, so that records, subarrays and metadata keep their layout."""
    same = dtype.names is None and dtype.metadata is None and np.dtype(dtype.str) == dtype
    return (dtype.str, None) if same else (f"|V{dtype.itemsize}", dtype)


class _Lease(weakref.ref):
    """The weak reference to a pin whose callback ends the pin's lease, ``end(lease)``, on
    whatever thread collected the pin's last view.  It carries what it needs instead of
    a closure: one object per pin, the fewest a get_many of thousands can make."""

    __slots__ = ("end", "lease")


def _cache_entry(pins: dict[str, weakref.ref[_Pin]], name: str, pin: _Pin) -> weakref.ref[_Pin]:
    """``pins[name]``'s weak reference to ``pin``, which removes itself from ``pins`` when
    the pin dies (on whatever thread the collection runs, so without the state's lock: if
    a get caches a new pin of ``name`` between the check and the removal, that entry goes
    instead, and the next get of the name takes the uncached path; no entry ever answers
    with a dead or other pin).  An entry may so go at any allocation, a collection's: every
    other removal is a ``pop``, and every walk of the cache walks a copy of it."""

    def drop(ref: weakref.ref[_Pin]) -> None:
        if pins.get(name) is ref:
            pins.pop(name, None)

    return weakref.ref(pin, drop)


def _end_nothing(lease: dict) -> None:
    """The end of a lease whose pin failed to be handed out: its caller ended it."""


class LocalState:
    """Per process and fabric; shared by every thread and every Fabric object."""

    def __init__(self, fabric_id: str) -> None:
        self.fabric_id = uuid.UUID(fabric_id)
        self.address: str | None = None  # the scheduler's, that references to its views name
        self.lock = threading.RLock()  # the mappings of blocks
        # Guards ``epoch`` and the writes of the cache: held only for steps that allocate
        # nothing and drop no pin, so no collection and no pin's callback (which may take
        # the local reads' lock) runs under it.  A get run by a collection under any other
        # lock (a user's finalizer, in a locked step of the local reads) so never waits
        # for a step that waits for that lock.
        self._cache_lock = threading.RLock()
        self._segments: dict[str, Segment] = {}
        # The latest view of each name, for cached gets: an entry per pin alive, each removing
        # itself as its pin dies (``_cache_entry``), not one per name ever read.
        self._pins: dict[str, weakref.ref[_Pin]] = {}
        # Invalidations so far: a get reads it before its lease, and caches its pin only if
        # it has not changed since (``pin``, ``cache``), checked under ``_cache_lock``.
        self.epoch = 0
        # Every pin alive, each holding a lease: a weak reference whose callback releases it
        # (lighter than ``weakref.finalize`` and a WeakSet, for a get_many of thousands).
        self._live: set[_Lease] = set()
        self._on_end = self._ended  # bound once: every pin's weak reference calls it

    def segment(self, node: str, shm_id: str) -> Segment | None:
        """The mapping of a block of this fabric on ``node``, or None if this process
        cannot map it (another machine, or another simulated node's block)."""
        seg = self._segments.get(shm_id)  # one dict read is atomic: the hot path takes no lock
        if seg is not None:
            return seg
        with self.lock:
            seg = self._segments.get(shm_id)
            if seg is not None:
                return seg
            try:
                seg = Segment.attach(shm_id)
            except (FileNotFoundError, PermissionError, ValueError):
                return None
            try:
                header = layout.read_block_header(seg.buf)
            except layout.LayoutError:
                header = None
            if header is None or header.fabric_id != self.fabric_id or header.node != node:
                seg.close()
                return None
            self._segments[shm_id] = seg
            return seg

    def map_own(self, segment: Segment) -> None:
        """The owner's own mapping serves its process's views too."""
        with self.lock:
            self._segments[segment.name.lstrip("/")] = segment

    def cached_view(self, name: str) -> np.ndarray | None:
        ref = self._pins.get(name)  # no lock: one dict read is atomic, and this is the hot path
        pin = ref() if ref is not None else None
        return None if pin is None else pin.view()

    def pin(
        self,
        name: str,
        node: str,
        segment: Segment,
        data_offset: int,
        extent_id: int,
        ftype: FabricType,
        lease: dict,
        end: Callable[[dict], None],
        *,
        cache: bool = True,
        since: int = -1,
        interface: tuple[dict, np.dtype | None] | None = None,
    ) -> _Pin:
        """A pin holding ``lease``; ``end(lease)`` ends it when the last view dies.
        ``cache``: later gets of ``name`` may answer with it (not for a deleted variable),
        if no invalidation came since ``epoch`` was ``since``, read before the lease was taken.
        ``interface``: the variable's ``interface_of``, when the caller has it already.  ``hold``'s
        steps written out: a task's first get comes here, where each frame costs µs."""
        pin = _Pin(segment, node, data_offset, extent_id, ftype, lease, interface)
        ref = _Lease(pin, self._on_end)
        ref.end = end
        ref.lease = lease
        self._live.add(ref)
        if cache:  # checked and written in one step: ``invalidate`` drops it, or it is not written
            self._cache_held(name, pin, ref, since)
        return pin

    def hold(
        self,
        node: str,
        segment: Segment,
        data_offset: int,
        extent_id: int,
        ftype: FabricType,
        lease: dict,
        end: Callable[[dict], None],
        interface: tuple[dict, np.dtype | None] | None = None,
    ) -> _Pin:
        """A pin whose death ends ``lease``, not yet cached by name (``cache``).  Its weak
        reference joins ``_live`` at once (one atomic set.add): a reference nobody holds
        would die before the pin, and its callback with it."""
        pin = _Pin(segment, node, data_offset, extent_id, ftype, lease, interface)
        ref = _Lease(pin, self._on_end)
        ref.end = end
        ref.lease = lease
        self._live.add(ref)
        return pin

    def take(self, name: str, pin: _Pin, end: Callable[[dict], None], since: int) -> None:
        """A pin made ahead with no lease (``LocalReads`` readies the first views of new
        names) holds ``pin.lease`` from now on: its death ends it, as ``pin``'s does; it is
        cached as ``pin`` caches.  If this raises, the pin holds no lease (the caller ends
        it), as with ``pin``."""
        ref = _Lease(pin, self._on_end)
        ref.end = end
        ref.lease = pin.lease
        self._live.add(ref)
        self._cache_held(name, pin, ref, since)

    def _cache_held(self, name: str, pin: _Pin, ref: _Lease, since: int) -> None:
        """Cache ``pin`` by name once its lease's weak reference ``ref`` is registered,
        unless an invalidation came since ``epoch`` was ``since`` (read before the lease).
        The check and the write are one step under ``_cache_lock``, under which every
        invalidation advances the epoch before it drops entries: so an entry is written
        before an invalidation, which drops it, or not at all.  (Written first and checked
        after, an entry written after an invalidation answered other threads' gets of the
        name bound anew with the deleted variable until its writer checked.)  The entry is
        made before: nothing under that lock allocates.  A failure here (an allocation)
        disarms ``ref`` before it propagates: whoever asked for the pin ends the lease on a
        failure, so its death must not end it too (the failure's frames may keep ``ref``
        alive until after the pin dies), and no entry of it may stay to answer gets."""
        entry = None
        try:
            entry = _cache_entry(self._pins, name, pin)
            with self._cache_lock:
                if self.epoch == since:
                    self._pins[name] = entry
        except BaseException:
            self._live.discard(ref)
            ref.end = _end_nothing
            if entry is not None and self._pins.get(name) is entry:
                self._pins.pop(name, None)
            raise

    def cache(self, names: list[str], pins: list[_Pin], since: int) -> None:
        """Later gets of these names answer with these pins' views, written in one step,
        unless an invalidation came since ``epoch`` was ``since``, before their leases (the
        entries are made before it: nothing under ``_cache_lock`` allocates)."""
        entries = {name: _cache_entry(self._pins, name, pin) for name, pin in zip(names, pins, strict=True)}
        with self._cache_lock:
            if self.epoch == since:
                self._pins.update(entries)

    def _ended(self, ref: _Lease) -> None:
        """A pin died (wherever its last view did); set.discard is atomic."""
        self._live.discard(ref)
        ref.end(ref.lease)

    def pins_leased_before(self, var_id: int) -> list[_Pin]:
        """Live pins whose lease a YellowPages older than ids from ``var_id`` granted."""
        with self.lock:
            return [pin for ref in list(self._live) if (pin := ref()) is not None and pin.var_id < var_id]

    def invalidate(self, var_ids: list[int]) -> None:
        """Drop the entries of these variables (deleted), and of dead pins.  The epoch goes
        first: an entry checked and written from then on was leased after this came, so
        not of these; one written before is in the copy walked.  The walk takes no lock
        (pins it drops may die in it, and their callbacks take other locks): an entry is
        taken out only if still the name's, and a new one taken out in between costs a
        cache miss, as in ``_cache_entry``."""
        drop = set(var_ids)
        self._advance()
        for name, ref in self._pins.copy().items():
            pin = ref()
            if (pin is None or pin.var_id in drop) and self._pins.get(name) is ref:
                self._pins.pop(name, None)

    def forget(self, name: str) -> None:
        self._advance()
        self._pins.pop(name, None)

    def forget_prefix(self, prefix: str) -> None:
        self._advance()
        for name in [n for n in self._pins.copy() if n.startswith(prefix)]:
            self._pins.pop(name, None)

    def _advance(self) -> None:
        with self._cache_lock:
            self.epoch += 1

    def detach(self, shm_ids: list[str]) -> None:
        """Blocks were unlinked: unmap them (views still alive keep their pages until
        they die) and forget views on them."""
        gone = {s.lstrip("/") for s in shm_ids}
        for name, ref in self._pins.copy().items():
            pin = ref()
            if (pin is None or pin.segment.name.lstrip("/") in gone) and self._pins.get(name) is ref:
                self._pins.pop(name, None)
        with self.lock:
            for shm_id in gone:
                seg = self._segments.pop(shm_id, None)
                if seg is not None:
                    seg.close()


_states: dict[str, LocalState] = {}
_states_lock = threading.Lock()


def local_state(fabric_id: str, address: str | None = None) -> LocalState:
    """``address``: the scheduler's, which references to this process's views name."""
    state = _states.get(fabric_id)  # one dict read is atomic: a task's first get takes no lock
    if state is not None and (state.address or not address):
        return state
    with _states_lock:
        state = _states.get(fabric_id)
        if state is None:
            state = _states[fabric_id] = LocalState(fabric_id)
        state.address = state.address or address
        return state


def state_of(pin: _Pin) -> LocalState | None:
    """The state whose pin this is: it knows the fabric and the scheduler."""
    ref = weakref.ref(pin)  # equal to the state's own ref of it: weak references compare by referent
    for state in all_states():
        if ref in state._live:
            return state
    return None


def all_states() -> list[LocalState]:
    with _states_lock:
        return list(_states.values())
