"""A block owner SIGKILLed in the middle of a bulk free, its block taken over by a peer.

What a ``delete_many`` of many names across one block asks of its owner: one ``free`` of
the whole batch, each run of neighbours (freed or free already) merged with one header
write: one store of the size of the free extent it starts with (``layout.grow_free``),
or the state, then the size, of its first extent.  A forked child (the owner)
runs the worker's ``free`` handler over a real shared-memory block and is stopped, then
SIGKILLed, before each of the atomic stores that free makes (``layout._store``); a peer
then adopts the block knowing only which extents the directory still lists.  After every
kill point: the block tiles exactly, no two free extents touch, no byte is leaked (the
free bytes are all but the survivors), and every surviving extent holds its bytes.
"""

from __future__ import annotations

import os
import signal
import threading

from datafabric import layout
from datafabric.layout import ExtentState
from datafabric.views import local_state
from tests.blocks import FABRIC, NODE, check_block, put, shm_block
from worker_plugin.allocator import BlockAllocator
from worker_plugin.plugin import FabricWorkerPlugin, OwnedBlock

KiB = 1 << 10
SIZE = 2 << 20


def owner(name: str, segment, allocator) -> FabricWorkerPlugin:
    """The worker plugin as the block's owner (or a peer, with no block) has it."""
    plugin = FabricWorkerPlugin(str(FABRIC))
    plugin.node, plugin.lock = NODE, threading.Lock()
    plugin.blocks = {} if segment is None else {name: OwnedBlock(segment, allocator)}
    plugin.state = local_state(str(FABRIC))
    return plugin


def laid_out(segment) -> tuple[BlockAllocator, dict[int, str], list[tuple[int, int]]]:
    """60 sealed extents of assorted sizes, a reserved one, a few holes; and the batch:
    runs of neighbours (each merged into the one before), lone ones, ones beside holes on
    either side, the block's first extent and the one before its free tail."""
    allocator = BlockAllocator(segment.buf, SIZE, fresh=True)
    ids = {}
    for i in range(60):
        ids[put(segment, allocator, f"v{i}", (i * 7919) % (20 * KiB) + 100)] = f"v{i}"
    ids[put(segment, allocator, "reserved", 3000, seal=False)] = "reserved"
    ids[put(segment, allocator, "last", 5000)] = "last"
    extents = [(o, layout.read_extent(segment.buf, o).extent_id) for o, _, st in allocator.extents() if st]
    for k in (10, 11, 30, 45):  # holes already free before the batch
        offset, extent_id = extents[k]
        allocator.free(offset)
        del ids[extent_id]
    batch = [extents[k] for k in (0, 1, 2, 3, 5, 9, 12, 13, 20, 21, 22, 29, 31, 40, 44, 46, 47, 48, 49, 55, 61)]
    for _, extent_id in batch:
        del ids[extent_id]  # deleted: the directory lists only the others
    return allocator, ids, batch


def free_in_child(plugin: FabricWorkerPlugin, name: str, batch: list[tuple[int, int]], stop_at: int | None) -> int:
    """Fork the owner; it frees the batch and is SIGSTOPped before its ``stop_at``-th
    store, then SIGKILLed.  Returns how many stores the free made (with no stop)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the free
        os.close(read)
        store, calls = layout._store, []

        def counted(*args):
            if len(calls) == stop_at:
                os.kill(os.getpid(), signal.SIGSTOP)
            calls.append(args)
            store(*args)

        layout._store = counted
        try:
            plugin.free([(name, offset, extent_id) for offset, extent_id in reversed(batch)])  # any order
            os.write(write, str(len(calls)).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    stores = os.read(read, 64).decode()
    os.close(read)
    return int(stores) if stores else -1


def adopt_and_check(name: str, segment, survivors: dict[int, str], when: str) -> None:
    peer = owner(name, None, None)
    try:
        [answer] = peer.adopt([name], live={name: sorted(survivors)})
        adopted = peer.blocks[name].allocator
        found = check_block(segment, adopted, survivors)  # tiles, no free neighbours, exact bytes
        assert sorted(e["extent_id"] for e in answer["extents"]) == sorted(survivors), when
        assert adopted.free_bytes == adopted.capacity - sum(e.size for e in found.values()), f"leaked {when}"
        assert answer["free"] == adopted.free_bytes, when
        reserved = {e.extent_id for e in found.values() if e.state is ExtentState.RESERVED}
        assert reserved == {i for i, n in survivors.items() if n == "reserved"}, when
    finally:
        peer.state.detach([name])  # the adopter's mapping; the block is shm_block's to unlink
        peer.blocks.clear()


def test_an_owner_killed_before_each_store_of_a_bulk_free_leaves_an_adoptable_block():
    with shm_block(SIZE) as segment:
        name = segment.name.lstrip("/")
        allocator, survivors, batch = laid_out(segment)
        stores = free_in_child(owner(name, segment, allocator), name, batch, None)
        # One header write per run of neighbours (freed or free already), not one per extent: a run
        # starting with a free extent is one store of its size; any other, its state, then its size.
        assert 0 < stores < len(batch)
        adopt_and_check(name, segment, survivors, "after a whole free")
    for stop_at in range(stores):
        with shm_block(SIZE) as segment:
            name = segment.name.lstrip("/")
            allocator, survivors, batch = laid_out(segment)
            free_in_child(owner(name, segment, allocator), name, batch, stop_at)
            adopt_and_check(name, segment, survivors, f"killed before store {stop_at} of {stores}")
