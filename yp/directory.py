"""The YellowPages' state: names, blocks, leases and pending reservations.

Kept free of Dask so every rule (write-once names, memory held while leased, nothing
freed twice) is plain code that the plugin's handlers call.  Methods that end a piece of
memory's life return the extents to free; the plugin tells their owners.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

from datafabric.errors import (
    BlockInUseError,
    BlockNotFoundError,
    NameExistsError,
    NameNotFoundError,
    NotOnThisNodeError,
    OutOfSpaceError,
)

Location = tuple[str, str, int]  # (node, shm_id, data offset)


@dataclass(frozen=True)
class ExtentRef:
    """One extent to free: which worker owns it, in which block, at which header offset."""

    worker: str
    shm_id: str
    offset: int


@dataclass
class Block:
    shm_id: str
    node: str
    worker: str | None  # None: its owner died and no worker of the node has adopted it yet
    size: int
    capacity: int
    used: int = 0  # bytes of sealed, deleted-but-leased and pending extents known here

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass
class Copy:
    shm_id: str
    extent_offset: int
    extent_size: int
    data_offset: int


@dataclass
class Variable:
    var_id: int
    name: str
    doc: str
    type: str
    nbytes: int
    copies: list[Copy]
    leases: Counter = field(default_factory=Counter)  # holder -> count
    deleted: bool = False
    last_used: float = 0.0  # monotonic time of the last acquire: replicas are evicted LRU


class Directory:
    def __init__(self) -> None:
        self.workers: dict[str, str] = {}  # worker address -> node
        self.blocks: dict[str, Block] = {}
        self.variables: dict[str, Variable] = {}  # visible names only
        self.by_id: dict[int, Variable] = {}  # visible and deleted-but-leased
        self.pending: dict[tuple[str, int], tuple[str, int]] = {}  # (shm, ext) -> (writer, size)
        self.orphans: dict[str, set[str]] = {}  # node -> blocks whose owner died, to adopt
        # Ids never repeat across YellowPages incarnations: a release from a process that
        # outlived a scheduler restart cannot end somebody else's lease.
        self.first_id = time.time_ns() // 1000
        self._ids = itertools.count(self.first_id)

    # -- blocks ---------------------------------------------------------------------
    def add_block(self, block: Block) -> None:
        self.blocks[block.shm_id] = block

    def block(self, node: str, shm_id: str) -> Block:
        block = self.blocks.get(shm_id)
        if block is None or block.node != node:
            raise BlockNotFoundError(f"no block {shm_id!r} on node {node!r}; `datafabric status` lists the blocks")
        return block

    def check_removable(self, block: Block) -> None:
        live = sorted(v.name for v in self.by_id.values() if any(c.shm_id == block.shm_id for c in v.copies))
        pending = [k for k in self.pending if k[0] == block.shm_id]
        if live or pending:
            what = f"variables {live[:5]}{'...' if len(live) > 5 else ''}" if live else ""
            what += (" and " if live and pending else "") + (f"{len(pending)} inserts in progress" if pending else "")
            raise BlockInUseError(
                f"block {block.shm_id} on node {block.node} still holds {what}; delete them "
                "(and let readers drop their views) before deallocating it"
            )

    def remove_block(self, shm_id: str) -> Block:
        return self.blocks.pop(shm_id)

    def placement(self, nbytes: int, node: str | None, exclude: set[str] = frozenset()) -> list[Block]:
        """Blocks that may fit ``nbytes``: the caller's node first, then the emptiest."""
        fits = [b for b in self.owned() if b.free >= nbytes and b.shm_id not in exclude]
        return sorted(fits, key=lambda b: (b.node != node, -b.free))

    def out_of_space(self, nbytes: int) -> OutOfSpaceError:
        free: dict[str, int] = {}
        for b in self.blocks.values():
            free[b.node] = free.get(b.node, 0) + b.free
        per_node = ", ".join(f"{n}: {f / 2**20:.1f} MiB" for n, f in sorted(free.items())) or "no blocks"
        return OutOfSpaceError(
            f"no block has {nbytes / 2**20:.1f} MiB free in one piece (free per node: {per_node}); "
            "delete variables or call fabric.allocate(mb) to add memory"
        )

    # -- inserts --------------------------------------------------------------------
    def add_pending(self, writer: str, shm_id: str, extent_offset: int, extent_size: int) -> None:
        self.pending[(shm_id, extent_offset)] = (writer, extent_size)
        self.blocks[shm_id].used += extent_size

    def drop_pending(self, shm_id: str, extent_offset: int) -> ExtentRef | None:
        entry = self.pending.pop((shm_id, extent_offset), None)
        block = self.blocks.get(shm_id)
        if entry is None or block is None:
            return None
        block.used -= entry[1]
        return ExtentRef(block.worker, shm_id, extent_offset)

    def check_new_names(self, names: list[str]) -> None:
        existing = sorted({n for n in names if n in self.variables})
        twice = sorted({n for n, k in Counter(names).items() if k > 1} - set(existing))
        if not existing and not twice:
            return
        listed = ", ".join(repr(n) for n in (existing + twice)[:5]) + (" ..." if len(existing) + len(twice) > 5 else "")
        if len(existing) == 1 and not twice:
            what = f"a variable named {listed} exists already"
        elif existing and not twice:
            what = f"variables named {listed} exist already"
        else:
            what = f"names {listed} exist already or come twice in one batch"
        raise NameExistsError(f"{what}; variables are write-once: delete it first or choose another name")

    def seal(self, name: str, doc: str, type_: str, nbytes: int, copy: Copy) -> Variable:
        self.check_new_names([name])
        block = self.blocks[copy.shm_id]
        entry = self.pending.pop((copy.shm_id, copy.extent_offset), None)
        if entry is None:
            block.used += copy.extent_size
        var = Variable(next(self._ids), name, doc, type_, nbytes, [copy])
        self.variables[name] = var
        self.by_id[var.var_id] = var
        return var

    # -- reads ----------------------------------------------------------------------
    def lookup(self, name: str) -> Variable:
        var = self.variables.get(name)
        if var is None:
            raise NameNotFoundError(f"no variable named {name!r}; fabric.get_list() shows the names")
        return var

    def at_location(self, node: str, shm_id: str, offset: int) -> Variable:
        self.block(node, shm_id)
        for var in self.variables.values():
            if any(c.shm_id == shm_id and c.data_offset == offset for c in var.copies):
                return var
        raise NotOnThisNodeError(
            f"no variable starts at offset {offset} of block {shm_id} on node {node}; "
            "use a location returned by fabric.get_locations(name)"
        )

    def locations(self, var: Variable) -> list[Location]:
        return [(self.blocks[c.shm_id].node, c.shm_id, c.data_offset) for c in var.copies]

    def owners(self, var: Variable) -> list[str]:
        return [self.blocks[c.shm_id].worker for c in var.copies]

    def on_node(self, var: Variable, node: str) -> bool:
        return any(self.blocks[c.shm_id].node == node for c in var.copies)

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

    def drop_copy(self, var: Variable, copy: Copy) -> ExtentRef:
        var.copies.remove(copy)
        return self.release_copy(copy)

    def release_copy(self, copy: Copy) -> ExtentRef:
        block = self.blocks[copy.shm_id]
        block.used -= copy.extent_size
        return ExtentRef(block.worker, copy.shm_id, copy.extent_offset)

    def seal_pending_copy(self, shm_id: str, extent_offset: int, data_offset: int) -> Copy:
        """A reserved extent filled by the fabric itself (a replica) becomes a copy."""
        _, size = self.pending.pop((shm_id, extent_offset))
        return Copy(shm_id, extent_offset, size, data_offset)

    def add_copy(self, var: Variable, copy: Copy) -> None:
        var.copies.append(copy)

    def acquire(self, var: Variable, holder: str) -> None:
        var.leases[holder] += 1
        var.last_used = time.monotonic()

    def release(self, var_id: int, holder: str) -> list[ExtentRef]:
        var = self.by_id.get(var_id)
        if var is None or var.leases[holder] <= 0:
            return []
        var.leases[holder] -= 1
        if var.leases[holder] == 0:
            del var.leases[holder]
        return self._free_if_done(var)

    # -- deletes and departures -----------------------------------------------------
    def delete(self, name: str) -> tuple[Variable, list[ExtentRef]]:
        var = self.lookup(name)
        del self.variables[name]
        var.deleted = True
        return var, self._free_if_done(var)

    def drop_holder(self, holder: str) -> list[ExtentRef]:
        """A process is gone: its leases end and its unfinished inserts are given back."""
        freed: list[ExtentRef] = []
        for var in list(self.by_id.values()):
            if var.leases.pop(holder, 0):
                freed += self._free_if_done(var)
        for shm_id, offset in [k for k, (w, _) in self.pending.items() if w == holder]:
            ref = self.drop_pending(shm_id, offset)
            if ref is not None:
                freed.append(ref)
        return freed

    def owned(self) -> list[Block]:
        return [b for b in self.blocks.values() if b.worker is not None]

    def orphan_blocks(self, worker: str) -> list[str]:
        """The worker died; its blocks stay in shared memory, waiting for a worker of
        the same node to adopt them.  Returns the names of variables now unavailable."""
        gone = {s for s, b in self.blocks.items() if b.worker == worker}
        for shm_id in gone:
            block = self.blocks[shm_id]
            block.worker = None
            self.orphans.setdefault(block.node, set()).add(shm_id)
        return sorted(v.name for v in self.variables.values() if not self.available(v))

    def available(self, var: Variable) -> bool:
        return any(self.blocks[c.shm_id].worker is not None for c in var.copies)

    def live_extents(self, shm_id: str) -> list[int]:
        """Extents of a block that must survive its adoption: copies of variables still
        known (visible or leased) and reservations of writers still alive."""
        live = [c.extent_offset for v in self.by_id.values() for c in v.copies if c.shm_id == shm_id]
        return sorted(live + [off for (s, off) in self.pending if s == shm_id])

    def adopt(self, shm_id: str, worker: str, free: int) -> None:
        block = self.blocks[shm_id]
        block.worker = worker
        block.used = block.capacity - free
        self.orphans.get(block.node, set()).discard(shm_id)

    def recover_block(self, block: Block, sealed: list[dict]) -> list[ExtentRef]:
        """A block found in shared memory by a restarted YellowPages: its sealed extents
        become variables again, a second copy of a name a replica.  Returns the extents
        that contradict a name already known (another type or size), to free."""
        self.blocks[block.shm_id] = block
        conflicting = []
        for ext in sealed:
            copy = Copy(block.shm_id, ext["extent_offset"], ext["extent_size"], ext["data_offset"])
            known = self.variables.get(ext["name"])
            if known is None:
                var = Variable(next(self._ids), ext["name"], ext["doc"], ext["type"], ext["nbytes"], [copy])
                self.variables[var.name] = self.by_id[var.var_id] = var
            elif (known.type, known.nbytes) == (ext["type"], ext["nbytes"]):
                known.copies.append(copy)
            else:
                conflicting.append(self.release_copy(copy))
        return conflicting

    def holders(self, var: Variable) -> list[str]:
        return list(var.leases)

    def _free_if_done(self, var: Variable) -> list[ExtentRef]:
        if not var.deleted or var.leases:
            return []
        self.by_id.pop(var.var_id, None)
        refs = []
        for c in var.copies:
            block = self.blocks.get(c.shm_id)
            if block is not None:
                block.used -= c.extent_size
                refs.append(ExtentRef(block.worker, c.shm_id, c.extent_offset))
        return refs
