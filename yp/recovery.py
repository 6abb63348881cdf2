"""How the directory learns blocks it did not see change: a dead owner's blocks adopted by
a peer, blocks a restarted YellowPages finds in shared memory, and the variable at a
place in a block, as a view kept through a restart declares it.  A mixin of
``yp.directory.Directory``, kept apart because only membership (adoption, take-back) and
those declarations run it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datafabric.errors import KeptViewLostError, NotOnThisNodeError, VariableUnavailableError
from datafabric.layout import ExtentState
from datafabric.messages import ExtentInfo
from yp.records import Adoption, Block, Copy, Pending, Variable

if TYPE_CHECKING:
    import itertools

    from yp.chunk_columns import ColumnStore
    from yp.records import Pending


class Recovery:
    blocks: dict[str, Block]
    pending: dict[tuple[str, int], Pending]
    variables: dict[str, Variable]
    by_id: dict[int, Variable]
    columns: ColumnStore
    _ids: itertools.count

    if TYPE_CHECKING:

        def pending_in(self, shm_id: str) -> list[Pending]: ...
        def copies_in(self, shm_id: str) -> list[tuple[Variable, Copy]]: ...
        def block(self, node: str, shm_id: str) -> Block: ...
        def uncount(self, copy: Copy) -> Copy: ...
        def _forget_copy(self, var: Variable, copy: Copy) -> None: ...

    def at_location(self, node: str, shm_id: str, offset: int, extent_id: int | None = None) -> Variable:
        """The visible variable at a location; with ``extent_id`` (a view kept through a
        restart), the variable whose extent there carries that id, deleted or not (a deleted
        one is still held, so its bytes are the view's), and no other."""
        if self.block(node, shm_id).unsettled:
            raise VariableUnavailableError(
                f"block {shm_id} of node {node} is being adopted after its owner died moving extents; try again"
            )
        if extent_id is None:
            for columns in self.columns:  # a chunk in columns is found, and materialised, first
                if (i := columns.at(shm_id, offset)) is not None:
                    self.columns.materialise((columns, i))
        else:
            for var, copy in self.copies_in(shm_id):
                if copy.data_offset == offset and copy.extent_id == extent_id:
                    return var
            raise KeptViewLostError(
                f"the extent {extent_id} a kept view read at offset {offset} of block {shm_id} is gone "
                "(freed or moved before the view was declared): the view holds no lease; drop it"
            )
        for var in self.variables.values():
            if any(c.shm_id == shm_id and c.data_offset == offset for c in var.copies):
                return var
        raise NotOnThisNodeError(
            f"no variable starts at offset {offset} of block {shm_id} on node {node}; "
            "use a location returned by fabric.get_locations(name)"
        )

    def adopt(self, shm_id: str, worker: str, free: int, extents: list[ExtentInfo]) -> Adoption:
        """``worker`` owns the block now.  Its headers say where each kept extent is: a
        copy that moved before its move was reported is found again by its extent id.
        What changed while the block had no owner is settled too: an extent the
        directory stopped needing meanwhile (deleted, released, its writer gone) is to
        free, and a header whose mark its dead owner never wrote is to mark.  A RESERVED
        extent the directory does not name in a block its owner handed off closing is that
        owner's own reservation, which its tasks may still write: kept as a departed
        writer's (``yp/departed.py``), freed once its process is gone."""
        block = self.blocks[shm_id]
        block.worker, block.unsettled = worker, False
        block.used = block.capacity - free
        found = {e["extent_id"]: e for e in extents}
        adoption = Adoption()
        needed = {p.copy.extent_id for p in self.pending_in(shm_id)}
        for var, copy in self.copies_in(shm_id):
            e = found.get(copy.extent_id)
            if e is None:
                self._forget_copy(var, copy)
                adoption.lost.append(var.name)
                continue
            needed.add(copy.extent_id)
            copy.extent_offset, copy.data_offset, copy.extent_size = (
                e["extent_offset"],
                e["data_offset"],
                e["extent_size"],
            )
            want = ExtentState.DELETED if var.deleted else ExtentState.SEALED
            if e["state"] != want:
                adoption.to_mark.setdefault(want, []).append((var.name, copy))
        for extent_id, e in found.items():
            if extent_id not in needed:
                copy = Copy(shm_id, e["extent_offset"], e["extent_size"], e["data_offset"], extent_id)
                if block.closed_by is not None and e["state"] == ExtentState.RESERVED:
                    holder, process = block.closed_by
                    self.pending[(shm_id, copy.extent_offset)] = Pending(holder, copy, process, departed=True)
                else:
                    adoption.to_free.append(self.uncount(copy))
        block.closed_by = None
        return adoption

    def recover_block(self, block: Block, extents: list[ExtentInfo]) -> list[ExtentInfo]:
        """A block found in shared memory by a restarted YellowPages: its sealed extents
        become variables again, a second copy of a name a replica.  Returns the extents that
        are no visible variable: deleted while read, reserved, or sealed under a name
        already known with another type or size (``KeptViews.take_back`` keeps them held
        until the views kept through the crash are declared)."""
        self.blocks[block.shm_id] = block
        unnamed = []
        for e in extents:
            if e["state"] != ExtentState.SEALED:
                unnamed.append(e)
                continue
            copy = Copy(block.shm_id, e["extent_offset"], e["extent_size"], e["data_offset"], e["extent_id"])
            known = self.variables.get(e["name"])
            if known is None:
                var = Variable(next(self._ids), e["name"], e["doc"], e["type"], e["nbytes"], [copy])
                self.variables[var.name] = self.by_id[var.var_id] = var
            elif (known.type, known.nbytes) == (e["type"], e["nbytes"]):
                known.copies.append(copy)
            else:
                unnamed.append(e)
        return unnamed

    def recover_deleted(self, e: ExtentInfo, copy: Copy) -> Variable:
        """An extent a take-back found that is no visible variable: a deleted variable (no
        name) until its last lease ends."""
        var = Variable(next(self._ids), e["name"], e["doc"], e["type"], e["nbytes"], [copy], deleted=True)
        self.by_id[var.var_id] = var
        return var
