"""What the directory records: blocks, variables and their copies.

A ``Copy``'s offsets change only under its block's exclusive hold (``yp.moves``): a
compaction rewrites them from its owner's report, an adoption from the extent ids the
block's headers carry.  Code that sends a copy's offsets to an owner reads them after the
block is settled, in the same step, or under the block's shared hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datafabric.layout import ExtentState


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

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(slots=True)  # a million of them: no __dict__ each
class Copy:
    """One extent of a block holding a variable's bytes (or reserved for them)."""

    shm_id: str
    extent_offset: int
    extent_size: int
    data_offset: int
    extent_id: int  # written in the extent's header; it follows the extent when it moves


@dataclass(slots=True)  # a million of them: no __dict__ each
class Variable:
    var_id: int
    name: str
    doc: str
    type: str
    nbytes: int
    copies: list[Copy]
    leases: dict[str, int] = field(default_factory=dict)  # holder -> count
    deleted: bool = False
    last_used: float = 0.0  # monotonic time of the last acquire or local read reported: replicas are evicted LRU


@dataclass(slots=True)
class Pending:
    """A reservation the directory handed out (to a writer off its own blocks, or to the
    fabric itself for a copy); a writer's reservations in its own blocks are its own."""

    holder: str
    copy: Copy


@dataclass
class Adoption:
    """What a block's adoption leaves to do: names of copies it no longer holds, extents
    to free, and headers to mark."""

    lost: list[str] = field(default_factory=list)
    to_free: list[Copy] = field(default_factory=list)
    to_mark: dict[ExtentState, list[tuple[str, Copy]]] = field(default_factory=dict)
