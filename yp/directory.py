"""The YellowPages' state: names, blocks, leases and pending reservations.

Kept free of Dask so every rule (write-once names, memory held while leased, nothing
freed twice, a copy found again by its extent id) is plain code that the components
call and that unit tests drive with no cluster.  Methods that end a piece of memory's
life return the copies to free; ``yp.owners`` tells their owners, reading each copy's
offsets only when its block is settled.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterable

from sortedcontainers import SortedDict

from datafabric.errors import (
    BlockInUseError,
    BlockNotFoundError,
    HolderAwayError,
    NameNotFoundError,
    OutOfSpaceError,
)
from datafabric.messages import ProcessId, Reservation, SealItem, VariableInfo
from yp import name_index, sizing
from yp.chunk_columns import ChunkColumns, ColumnStore
from yp.records import Block, Copy, Pending, Variable
from yp.recovery import Recovery


class Directory(Recovery):
    def __init__(self) -> None:
        self.blocks: dict[str, Block] = {}
        # Sealed datasets' chunks not needed as objects yet (``yp.chunk_columns``): a look-up
        # in ``variables`` or ``by_id`` materialises one.
        self.columns = ColumnStore()
        # Visible names only, kept sorted: a page of a listing costs O(log n + page).
        self.variables: SortedDict[str, Variable] = self.columns.variables
        self.by_id: dict[int, Variable] = self.columns.by_id  # visible and deleted-but-leased
        self.published = self.columns.published  # var id -> workers told of it (yp.local_leases)
        self.pending: dict[tuple[str, int], Pending] = {}  # (shm_id, extent offset) -> reservation
        self.datasets: dict = {}  # name -> yp.dataset_table.DatasetRecord; names shared with variables
        # Processes whose leases and reservations ended as they left: a request of theirs
        # that arrives later (it was in flight) records nothing, or nobody would end it.
        self.departed: set[str] = set()
        # Ids never repeat across YellowPages incarnations: a release from a process that
        # outlived a scheduler restart cannot end somebody else's lease.
        self.first_id = time.time_ns() // 1000
        self._ids = itertools.count(self.first_id)

    # -- blocks ---------------------------------------------------------------------
    def begin_block(self, shm_id: str, node: str, worker: str) -> None:
        """A block whose creation was ordered: if its creator dies before confirming it,
        whoever adopts the node removes whatever it left."""
        self.blocks[shm_id] = Block(shm_id, node, worker, 0, 0, creating=True)

    def confirm_block(self, shm_id: str, size: int, capacity: int) -> None:
        block = self.blocks[shm_id]
        block.size, block.capacity, block.creating = size, capacity, False

    def add_block(self, block: Block) -> None:
        self.blocks[block.shm_id] = block

    def remove_block(self, shm_id: str) -> Block | None:
        return self.blocks.pop(shm_id, None)

    def block(self, node: str, shm_id: str) -> Block:
        block = self.blocks.get(shm_id)
        if block is None or block.node != node or block.creating:
            raise BlockNotFoundError(f"no block {shm_id!r} on node {node!r}; `datafabric status` lists the blocks")
        return block

    def ready(self) -> list[Block]:
        """Blocks that exist, owned or orphaned (not ones still being created)."""
        return [b for b in self.blocks.values() if not b.creating]

    def owned(self) -> list[Block]:
        return [b for b in self.ready() if b.worker is not None]

    def orphaned(self, node: str) -> list[Block]:
        """The one record of orphans: blocks of ``node`` with no owner."""
        return [b for b in self.blocks.values() if b.node == node and b.worker is None]

    def copies_in(self, shm_id: str) -> list[tuple[Variable, Copy]]:
        """Every copy in the block: its chunks in columns are materialised (moves, adoptions,
        kept views and removals work on objects)."""
        self.columns.materialise_block(shm_id)
        return [(v, c) for v in self.by_id.values() for c in v.copies if c.shm_id == shm_id]

    def pending_in(self, shm_id: str) -> list[Pending]:
        return [p for (s, _), p in self.pending.items() if s == shm_id]

    def check_removable(self, block: Block) -> None:
        live = sorted(v.name for v, _ in self.copies_in(block.shm_id))
        pending = self.pending_in(block.shm_id)
        if live or pending:
            what = f"variables {live[:5]}{'...' if len(live) > 5 else ''}" if live else ""
            what += (" and " if live and pending else "") + (f"{len(pending)} inserts in progress" if pending else "")
            raise BlockInUseError(
                f"block {block.shm_id} on node {block.node} still holds {what}; delete them "
                "(and let readers drop their views) before deallocating it"
            )

    def placement(self, nbytes: int, node: str | None, exclude: set[str] = frozenset()) -> list[Block]:
        """Owned blocks that may fit ``nbytes``: the caller's node first, then best fit (the
        least free first), so small variables fill small blocks before they cut into a
        node's large one (``yp.sizing``)."""
        fits = [b for b in self.owned() if b.free >= nbytes and b.shm_id not in exclude]
        return sorted(fits, key=lambda b: (b.node != node, b.free))

    def out_of_space(self, nbytes: int, node: str | None = None) -> OutOfSpaceError:
        return sizing.out_of_space(self.ready(), nbytes, node)

    # -- inserts --------------------------------------------------------------------
    def add_pending(self, holder: str, shm_id: str, r: Reservation) -> Copy:
        self.check_present(holder)
        copy = Copy(shm_id, r["extent_offset"], r["extent_size"], r["data_offset"], r["extent_id"])
        self.pending[(shm_id, copy.extent_offset)] = Pending(holder, copy)
        self.blocks[shm_id].used += copy.extent_size
        return copy

    def drop_pending(self, shm_id: str, extent_offset: int, extent_id: int | None = None) -> Copy | None:
        """A reservation given back: its copy is to free.  With ``extent_id`` (a writer's
        abort), only the reservation carrying that id: a late abort of one that ended and
        whose memory was reserved again never ends the new one."""
        entry = self.pending.get((shm_id, extent_offset))
        if entry is None or (extent_id is not None and entry.copy.extent_id != extent_id):
            return None
        del self.pending[(shm_id, extent_offset)]
        block = self.blocks.get(shm_id)
        if block is None:
            return None
        block.used -= entry.copy.extent_size
        return entry.copy

    def check_new_names(self, names: list[str]) -> None:
        name_index.refuse_taken(names, self.variables, self.datasets)

    def seal_all(self, items: list[SealItem]) -> list[Variable]:
        """Written extents become visible variables, all or none."""
        self.check_new_names([item["name"] for item in items])
        self._check_blocks((item["shm_id"], repr(item["name"])) for item in items)
        return [self._seal(item) for item in items]

    def _check_blocks(self, written: Iterable[tuple[str, str]]) -> None:
        for shm_id, what in written:
            if (block := self.blocks.get(shm_id)) is None or block.creating:
                raise BlockNotFoundError(f"block {shm_id} holding {what} is gone (its node lost it); write it again")

    def seal(self, item: SealItem) -> Variable:
        return self.seal_all([item])[0]

    def _seal(self, item: SealItem) -> Variable:
        """A written extent becomes a visible variable (its reservation, if the directory
        handed it out, ends)."""
        shm_id = item["shm_id"]
        entry = self.pending.pop((shm_id, item["extent_offset"]), None)
        if entry is None:
            self.blocks[shm_id].used += item["extent_size"]
        copy = Copy(shm_id, item["extent_offset"], item["extent_size"], item["data_offset"], item["extent_id"])
        type_ = sys.intern(item["type"])  # types repeat across variables: one string each, not one per variable
        var = Variable(next(self._ids), item["name"], item["doc"], type_, item["nbytes"], [copy])
        self.variables[var.name] = self.by_id[var.var_id] = var
        return var

    def seal_chunks(
        self, dataset_id: int, doc: str, type_of: Callable[[int], str], homes: dict[int, Copy]
    ) -> ChunkColumns:
        """A dataset's written homes become its chunk variables, all or none, kept in
        columns.  Their names are new: they carry the dataset's id, which no other dataset
        had (ids never repeat), and the seal is its only one."""
        self._check_blocks((c.shm_id, f"chunk {f} of dataset {dataset_id}") for f, c in homes.items())
        first = next(self._ids)
        self._ids = itertools.count(first + max(1, len(homes)))  # one id per chunk, consecutive
        for copy in homes.values():
            if self.pending.pop((copy.shm_id, copy.extent_offset), None) is None:
                self.blocks[copy.shm_id].used += copy.extent_size
        columns = ChunkColumns(dataset_id, first, doc, type_of, homes)
        self.columns.add(columns)
        return columns

    def seal_pending_copy(self, shm_id: str, extent_offset: int) -> Copy:
        """A reserved extent filled by the fabric itself (a replica) becomes a copy."""
        return self.pending.pop((shm_id, extent_offset)).copy

    # -- reads ----------------------------------------------------------------------
    def lookup(self, name: str) -> Variable:
        var = self.variables.get(name)
        if var is None:
            raise NameNotFoundError(f"no variable named {name!r}; fabric.get_list() shows the names")
        return var

    def names(
        self, prefix: str = "", limit: int | None = None, after: str | None = None, hidden: str | None = None
    ) -> list[str]:
        return name_index.names(self.variables, prefix, limit, after, hidden)

    def count(self, prefix: str = "", hidden: str | None = None) -> int:
        return name_index.count(self.variables, prefix, hidden)

    def info(self, var: Variable) -> VariableInfo:
        """Where a reader finds ``var``: read it only while the copies' blocks are settled.
        A copy in a block whose owner died moving extents is left out until its adopter
        has said where its extents are."""
        copies = [(self.blocks[c.shm_id], c) for c in var.copies if not self.blocks[c.shm_id].unsettled]
        return {
            "var_id": var.var_id,
            "name": var.name,
            "doc": var.doc,
            "type": var.type,
            "nbytes": var.nbytes,
            "locations": [(b.node, c.shm_id, c.data_offset) for b, c in copies],
            "workers": [b.worker for b, _ in copies],
            "extent_ids": [c.extent_id for _, c in copies],
        }

    def nodes_of(self, var: Variable) -> set[str]:
        return {self.blocks[c.shm_id].node for c in var.copies}

    def nodes_of_chunk(self, name: str | None = None, var_id: int | None = None) -> set[str]:
        """Where a variable (by name or id) is, with no chunk in columns materialised: none
        if it is unknown."""
        found = self.columns.by_name(name) if name is not None else self.columns.by_var_id(var_id)
        if found is not None:
            columns, i = found
            return {self.blocks[columns.shm_ids[columns.block[i]]].node}
        var = dict.get(self.variables, name) if name is not None else self.by_id.known(var_id)
        return set() if var is None else self.nodes_of(var)

    def check_present(self, holder: str) -> None:
        if holder in self.departed:
            raise HolderAwayError(f"{holder} has left the cluster; its requests are void")

    def arrived(self, holder: str) -> None:
        self.departed.discard(holder)

    def acquire(self, var: Variable, holder: str) -> None:
        self.check_present(holder)
        var.add_lease(holder)
        var.last_used = time.monotonic()

    def used(self, var_ids: list[int]) -> None:
        """Variables read under local leases, which the directory does not see one by one."""
        now = time.monotonic()
        for var_id in var_ids:
            if (var := self.by_id.known(var_id)) is not None:  # a chunk in columns has one copy: never evicted
                var.last_used = now

    def add_leases(self, var: Variable, holder: str, count: int) -> None:
        """Leases ``holder`` took on its own (local leases, reported when recalled)."""
        var.add_lease(holder, count)

    def release(self, var_id: int, holder: str) -> list[Copy]:
        var = self.by_id.get(var_id)
        if var is None or not var.drop_lease(holder, 1):
            return []
        return self._free_if_done(var)

    def holders(self, var: Variable) -> list[str]:
        return list(var.leases)

    # -- copies ---------------------------------------------------------------------
    def evictable(self, node: str) -> list[tuple[Variable, Copy]]:
        """Replicas on ``node`` that may go: unleased, and never a variable's last copy;
        least recently used first."""
        found = [
            (var, c)
            for var in self.variables.values()
            if not var.leases and len(var.copies) > 1
            for c in var.copies
            if self.blocks[c.shm_id].node == node
        ]
        return sorted(found, key=lambda vc: vc[0].last_used)

    def drop_copy(self, var: Variable, copy: Copy) -> Copy:
        var.copies.remove(copy)
        return self.uncount(copy)

    def add_copy(self, var: Variable, copy: Copy) -> None:
        var.copies.append(copy)

    def uncount(self, copy: Copy) -> Copy:
        """The directory no longer counts ``copy``'s extent as used; returns it to free."""
        self.blocks[copy.shm_id].used -= copy.extent_size
        return copy

    # -- moves ----------------------------------------------------------------------
    def movable(self, shm_id: str) -> dict[int, tuple[Variable, Copy]]:
        """Copies a compaction of ``shm_id`` may move: of visible variables no lease holds.
        Taken under the block's exclusive hold, in one step with no lease granted since."""
        return {c.extent_offset: (v, c) for v, c in self.copies_in(shm_id) if not v.leases and not v.deleted}

    def moved(self, block: Block, movable: dict[int, tuple[Variable, Copy]], moved: list) -> list[str]:
        names = []
        for old, new_extent, new_data, new_size in moved:
            var, copy = movable[old]
            block.used += new_size - copy.extent_size
            copy.extent_offset, copy.data_offset, copy.extent_size = new_extent, new_data, new_size
            names.append(var.name)
        return names

    # -- deletes and departures -----------------------------------------------------
    def delete(self, var: Variable) -> list[Copy]:
        return self.delete_all([var])

    def delete_all(self, variables: list[Variable]) -> list[Copy]:
        """Each of ``variables`` (distinct) leaves the index, all or none: the copies to free."""
        index = self.variables
        if stale := [repr(v.name) for v in variables if index.get(v.name) is not v]:
            raise NameNotFoundError(f"{', '.join(stale[:5])} deleted meanwhile; fabric.get_list() shows the names")
        freed: list[Copy] = []
        for var in variables:
            del index[var.name]
            var.deleted = True
            freed += self._free_if_done(var)
        return freed

    def drop_holder(self, holder: str) -> list[Copy]:
        """A process left: its leases end and its unfinished inserts are given back, but
        for those it may still be writing into through its own mapping: leaving is not
        dying, so they stay, departed, until its process is proven gone (``yp/departed.py``)."""
        self.departed.add(holder)
        freed: list[Copy] = []
        for var in list(self.by_id.values()):
            if var.drop_lease(holder):
                freed += self._free_if_done(var)
        for key, entry in [(k, p) for k, p in self.pending.items() if p.holder == holder]:
            if entry.writer is not None:
                entry.departed = True
            elif (copy := self.drop_pending(*key)) is not None:
                freed.append(copy)
        return freed

    def stranded(self) -> list[tuple[tuple[str, int], Pending]]:
        """Reservations of departed writers that may still write into them."""
        return [(k, p) for k, p in self.pending.items() if p.departed]

    def orphan_blocks(self, worker: str, process: ProcessId | None = None) -> list[str]:
        """The worker left; its blocks stay in shared memory, waiting for a worker of the
        same node to adopt them (once ``process``, the worker's, is proven gone, if given).
        Returns the names of variables now unavailable."""
        for block in self.blocks.values():
            if block.worker == worker:
                block.worker, block.left_by = None, process
        orphans = {b.shm_id for b in self.blocks.values() if b.worker is None}
        unavailable = [v.name for v in self.variables.values() if not self.available(v)]
        return sorted(unavailable + self.columns.names_in(orphans))

    def available(self, var: Variable) -> bool:
        return any(self.blocks[c.shm_id].worker is not None for c in var.copies)

    def live_ids(self, shm_id: str) -> list[int]:
        """Extents of a block that must survive its adoption: copies of variables still
        known (visible or leased) and reservations of writers still alive."""
        live = [c.extent_id for _, c in self.copies_in(shm_id)]
        return sorted(live + [p.copy.extent_id for p in self.pending_in(shm_id)])

    def drop_block(self, shm_id: str) -> None:
        """A block that is gone from shared memory, with every copy it held."""
        for var, copy in self.copies_in(shm_id):
            self._forget_copy(var, copy)
        for key in [k for k in self.pending if k[0] == shm_id]:
            del self.pending[key]
        self.blocks.pop(shm_id, None)

    def _forget_copy(self, var: Variable, copy: Copy) -> None:
        var.copies.remove(copy)
        if not var.copies:  # nothing of it is left anywhere
            self.by_id.pop(var.var_id, None)
            if self.variables.get(var.name) is var:
                del self.variables[var.name]

    def _free_if_done(self, var: Variable) -> list[Copy]:
        if not var.deleted or var.leases:
            return []
        self.by_id.pop(var.var_id, None)
        return [self.uncount(c) for c in var.copies if c.shm_id in self.blocks]
