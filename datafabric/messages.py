"""The messages between the three parts: client and tasks, the YellowPages, block owners.

Every RPC argument or answer that is a record is one of these ``TypedDict``s, so both ends
name the same fields.  Offsets are bytes from the start of a block; ``extent_offset`` is
where an extent's header starts, ``data_offset`` where its data starts.
"""

from __future__ import annotations

from typing import TypedDict

Location = tuple[str, str, int]  # (node, shm_id, data offset)


class Reservation(TypedDict):
    """An extent reserved for a writer: invisible until sealed (block owner -> writer)."""

    shm_id: str
    extent_offset: int
    extent_size: int
    data_offset: int
    extent_id: int


class Placement(Reservation):
    """A reservation the YellowPages found for a writer with no room of its own."""

    worker: str  # the block's owner, who takes streamed bytes
    node: str


class SealItem(TypedDict):
    """One written variable to make visible (writer -> YellowPages)."""

    name: str
    doc: str
    type: str
    nbytes: int
    shm_id: str
    extent_offset: int
    extent_size: int
    data_offset: int
    extent_id: int


class VariableInfo(TypedDict):
    """What a reader needs to map a variable, and whom its lease is with."""

    var_id: int
    name: str
    doc: str
    type: str
    nbytes: int
    locations: list[Location]
    workers: list[str | None]  # each location's owner; None while its block is orphaned
    extent_ids: list[int]  # each location's extent id: a view kept through a restart is declared with it


class ReferenceGrant(TypedDict):
    """A lease taken by variable id for a view that travelled as a reference."""

    info: VariableInfo
    deleted: bool  # its name is gone: the view must not be cached under it


class LocalEntry(TypedDict):
    """A variable a worker may lease locally, at its copy on the worker's node
    (YellowPages -> the node's workers, on their streams)."""

    var_id: int
    name: str
    type: str
    shm_id: str
    data_offset: int
    extent_id: int


class Recalled(TypedDict):
    """A worker's answer to a recall (on its stream): it answers those names locally no
    more, and these local leases (``[var_id, count]``) are alive in it."""

    token: int
    leases: list[tuple[int, int]]


class KeptView(TypedDict):
    """A view a process kept through a scheduler restart, by location (a process that
    outlived its scheduler -> the restarted YellowPages; ``yp/kept_views.py``)."""

    node: str
    shm_id: str
    offset: int  # the view's data offset in the block
    extent_id: int  # the id in its extent's header: a variable placed there since has another


class ProcessId(TypedDict):
    """A process, as a block's owner on its machine can tell whether it still runs
    (writer -> YellowPages with a reservation; YellowPages -> owner; ``datafabric/processes.py``)."""

    boot: str  # /proc/sys/kernel/random/boot_id: which machine (and boot) it runs on
    pid_ns: str  # its pid namespace (readlink /proc/self/ns/pid): where its pid means it
    pid: int
    started: int  # field 22 of /proc/<pid>/stat (clock ticks after boot): a reused pid has another


class ExtentInfo(TypedDict):
    """An extent as its header describes it (block owner -> YellowPages)."""

    extent_id: int
    extent_offset: int
    extent_size: int
    data_offset: int
    state: int  # a layout.ExtentState
    name: str
    type: str
    doc: str
    nbytes: int


class CreatedBlock(TypedDict):
    shm_id: str
    size: int
    capacity: int
    block_uuid: str


class AdoptedBlock(TypedDict):
    """A block taken over by a worker, with the extents it kept; or, with ``unlinked``,
    a segment that never became a block, which the worker removed (size 0, no extents)."""

    shm_id: str
    size: int
    capacity: int
    free: int
    extents: list[ExtentInfo]
    unlinked: bool


class CompactReport(TypedDict):
    """What one block's compaction did (block owner -> YellowPages)."""

    moved: list[tuple[int, int, int, int]]  # (old extent offset, new extent offset, new data offset, new size)
    bytes_moved: int
    largest_free_before: int
    largest_free_after: int


class BlockCompaction(TypedDict):
    """One block's part of ``defragment``'s answer (YellowPages -> client)."""

    node: str
    shm_id: str
    moved: list[str]
    bytes_moved: int
    largest_free_before: int
    largest_free_after: int


class BlockStats(TypedDict):
    capacity: int
    free: int
    used: int
    largest_free: int | None  # None: the owner did not answer; the directory's own figures
    extents: int | None
    reserved: int | None
    variables: int | None  # sealed extents: copies of visible variables


class DatasetInfo(TypedDict):
    """A dataset as its handle needs it (YellowPages -> client and tasks)."""

    dataset_id: int  # names its chunks' variables: names.chunk_name(dataset_id, flat)
    name: str
    shape: list[int]
    element: str  # the datashape of one element: "float64", "{x: int32, y: float64}"
    chunks: list[int]
    fillvalue: bytes  # one element's bytes
    doc: str
    attrs: dict
    sealed: bool
    written: bytes  # sealed: np.packbits of "chunk holds a variable", C order; writing: b""


class ChunkHome(TypedDict):
    """Where a chunk being written lives (YellowPages -> writer): a RESERVED extent,
    filled with the fill value before anyone is told of it, unless it was placed
    unfilled for this ticket, which writes it whole (``unfilled``)."""

    flat: int
    type: str  # the chunk variable's datashape
    node: str
    worker: str | None  # the block's owner, who takes writes from other nodes
    shm_id: str
    extent_offset: int
    extent_id: int
    data_offset: int
    unfilled: bool
