"""What the directory records: blocks, variables and their copies.

A ``Copy``'s offsets change only under its block's exclusive hold (``yp.moves``): a
compaction rewrites them from its owner's report, an adoption from the extent ids the
block's headers carry.  Code that sends a copy's offsets to an owner reads them after the
block is settled, in the same step, or under the block's shared hold.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from datafabric.layout import ExtentState
from datafabric.messages import ProcessId


@dataclass
class Block:
    shm_id: str
    node: str
    worker: str | None  # None: orphaned; its owner died and no worker of the node has adopted it yet
    size: int
    capacity: int
    used: int = 0  # bytes of sealed, deleted-but-leased and pending extents known here
    creating: bool = False  # ordered but not confirmed: its creator may die half-way
    unsettled: bool = False  # its owner died moving extents: offsets unknown until it is adopted
    # The process of an owner removed by Dask, which may still run and write into the block
    # through its own allocator: no peer adopts the block until it is proven gone.
    left_by: ProcessId | None = None
    # (address, process) of an owner that handed it off closing: its tasks may still write
    # into their own reservations there, which its adopter keeps as that process's.
    closed_by: tuple[str, ProcessId] | None = None

    @property
    def free(self) -> int:
        return self.capacity - self.used


# One int object per distance from an extent's start to its data: the header, its metadata
# and the padding to the data's alignment, so at most a few hundred values, where an int
# over 256 would otherwise be one more 32-byte object per copy.
_SKIPS: dict[int, int] = {}


def _shared(skip: int) -> int:
    return _SKIPS.setdefault(skip, skip)


@dataclass(slots=True, init=False)  # a million of them: no __dict__ each
class Copy:
    """One extent of a block holding a variable's bytes (or reserved for them).  The data's
    offset is kept as its distance from the extent's start (the header and its padding:
    a few distinct values, each one shared object), not as one more int per copy."""

    shm_id: str
    extent_offset: int
    extent_size: int
    skip: int  # data_offset - extent_offset
    extent_id: int  # written in the extent's header; it follows the extent when it moves

    def __init__(self, shm_id: str, extent_offset: int, extent_size: int, data_offset: int, extent_id: int) -> None:
        self.shm_id = shm_id
        self.extent_offset = extent_offset
        self.extent_size = extent_size
        self.skip = _shared(data_offset - extent_offset)
        self.extent_id = extent_id

    @property
    def data_offset(self) -> int:
        return self.extent_offset + self.skip

    @data_offset.setter
    def data_offset(self, value: int) -> None:
        """Set after ``extent_offset`` when both change (a move, an adoption)."""
        self.skip = _shared(value - self.extent_offset)


NO_LEASES: Mapping[str, int] = MappingProxyType({})


def shrunk(table: dict) -> dict:
    """``table``, or a copy of it once it holds far fewer entries than it has room for: a
    dict never gives back the room a burst took (a dataset's 100,000 homes in flight at
    once would stay 30 bytes a chunk each in ``pending``, ``placing`` and ``unfilled``)."""
    return dict(table) if sys.getsizeof(table) > 4096 + 400 * len(table) else table


@dataclass(slots=True)  # a million of them: no __dict__ each
class Variable:
    var_id: int
    name: str
    doc: str
    type: str
    nbytes: int
    copies: list[Copy]
    # holder -> count; unleased, the one shared read-only NO_LEASES (a dict each would be
    # 64 bytes per variable, most of them never leased): change it through add_lease/drop_lease.
    leases: Mapping[str, int] = field(default_factory=lambda: NO_LEASES)
    deleted: bool = False
    last_used: float = 0.0  # monotonic time of the last acquire or local read reported: replicas are evicted LRU

    def add_lease(self, holder: str, count: int = 1) -> None:
        if self.leases is NO_LEASES:
            self.leases = {}
        self.leases[holder] = self.leases.get(holder, 0) + count

    def drop_lease(self, holder: str, count: int | None = None) -> int:
        """``count`` of ``holder``'s leases end (all of them, and its entry, with None);
        returns how many did."""
        held = self.leases.get(holder)
        if held is None:
            return 0
        ended = held if count is None else max(0, min(count, held))
        if count is None or (ended and held == ended):
            del self.leases[holder]
            if not self.leases:
                self.leases = NO_LEASES
        elif ended:
            self.leases[holder] = held - ended
        return ended


@dataclass(slots=True)
class Pending:
    """A reservation the directory handed out (to a writer off its own blocks, or to the
    fabric itself for a copy); a writer's reservations in its own blocks are its own."""

    holder: str
    copy: Copy
    # The process writing into it through its own mapping of the block, if it may (on the
    # block's node); None: its bytes pass through the block's owner, or the fabric's own.
    writer: ProcessId | None = None
    # Its holder left the scheduler while ``writer`` may still write: kept out of reuse
    # until the block's owner proves that process gone, or it seals or aborts (yp/departed.py).
    departed: bool = False


@dataclass
class Adoption:
    """What a block's adoption leaves to do: names of copies it no longer holds, extents
    to free, and headers to mark."""

    lost: list[str] = field(default_factory=list)
    to_free: list[Copy] = field(default_factory=list)
    to_mark: dict[ExtentState, list[tuple[str, Copy]]] = field(default_factory=dict)
