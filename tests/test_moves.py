"""Blocks whose owner was SIGKILLed mid-move or mid-creation, taken over by a peer.

The worker handler ``adopt`` runs here on a plugin object of this process (what a peer
worker runs, without its cluster), over real shared memory and real killed children; the
last test does the whole thing on a real LocalCluster.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
from distributed import Client

from datafabric import errors, layout, shm, start
from datafabric.layout import ExtentState
from datafabric.shm import Segment, new_block_name
from datafabric.views import local_state
from tests.blocks import FABRIC, NODE, check_block, shm_block
from tests.conftest import local_cluster
from tests.test_allocator import CRASH_SIZE, compact_in_child, fragmented
from tests.waiting import wait_for
from worker_plugin.plugin import FabricWorkerPlugin

MiB = 1 << 20


@pytest.fixture
def peer():
    """The worker plugin as a peer of the dead owner's node has it."""
    plugin = FabricWorkerPlugin(str(FABRIC))
    plugin.node, plugin.blocks, plugin.lock = NODE, {}, threading.Lock()
    plugin.state = local_state(str(FABRIC))
    yield plugin
    plugin._unlink_all()


def in_dev_shm(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


def killed_while_prefaulting(name: str, size: int) -> None:
    """A child creates the block and is SIGKILLed halfway through pre-faulting it."""
    pid = os.fork()
    if pid == 0:
        try:

            def populate(segment):
                np.frombuffer(segment.buf, np.uint8)[: size // 2 : 4096] = 1
                os.kill(os.getpid(), signal.SIGSTOP)

            shm._populate = populate
            Segment.create(name, size)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_block_whose_creator_died_prefaulting_is_unlinked_as_unfinished(peer):
    name = new_block_name(FABRIC, NODE)
    killed_while_prefaulting(name, 64 * MiB)
    assert in_dev_shm(name)
    [answer] = peer.adopt([], live={}, unfinished=[name])
    assert answer["shm_id"] == name and answer["unlinked"]
    assert not in_dev_shm(name) and not peer.blocks


def test_a_found_segment_with_no_header_is_unlinked_by_a_restarted_directory(peer):
    name = new_block_name(FABRIC, NODE)
    killed_while_prefaulting(name, 16 * MiB)
    [answer] = peer.adopt([name], live=None)
    assert answer["unlinked"] and not in_dev_shm(name)


def test_a_known_block_with_no_header_is_refused_not_unlinked(peer):
    """A directory that knows the block (``live`` given) confirmed it had a header: one
    gone missing is not a half-created block, and is left alone (and logged)."""
    with shm_block(MiB) as seg:
        seg.buf[:8] = bytes(8)
        assert peer.adopt([seg.name.lstrip("/")], live={}) == []
        assert in_dev_shm(seg.name.lstrip("/"))


def test_unfinished_names_of_another_node_are_not_unlinked(peer):
    other = new_block_name(FABRIC, "another-node")
    killed_while_prefaulting(other, MiB)
    try:
        assert peer.adopt([], live={}, unfinished=[other]) == []
        assert in_dev_shm(other)
    finally:
        Segment.attach(other).unlink()


@pytest.mark.parametrize("stage", ["begun", "copied", "progress", "freed"])
def test_a_block_killed_mid_move_is_adopted_by_extent_id(peer, stage):
    """The owner dies inside a move; the peer rolls it forward, keeps the extents whose
    ids the directory lists wherever they now are, frees the others, and describes the
    kept ones with their new offsets."""
    with shm_block(CRASH_SIZE) as seg:
        name = seg.name.lstrip("/")
        alloc, ids, movable = fragmented(seg)
        before = {layout.read_extent(seg.buf, o).extent_id: o for o, _, st in alloc.extents() if st}
        pristine = bytes(seg.buf)
        _, stages = compact_in_child(seg, alloc, movable, None, False)
        seg.buf[:] = pristine
        stop_at = [k for k, s in enumerate(stages) if s == stage][2]
        compact_in_child(seg, alloc, movable, stop_at, False)
        assert layout.read_journal(seg.buf) is not None or stage == "freed"
        wanted = sorted(i for i, n in ids.items() if n != "v3")
        [answer] = peer.adopt([name], live={name: wanted})
        assert not answer["unlinked"]
        kept = {e["extent_id"]: e for e in answer["extents"]}
        assert sorted(kept) == wanted
        expected = {i: ids[i] for i in wanted}
        found = check_block(seg, peer.blocks[name].allocator, expected)
        for extent_id, e in found.items():
            info = kept[extent_id]
            assert (info["extent_offset"], info["data_offset"], info["extent_size"]) == (
                e.offset,
                e.data_offset,
                e.size,
            )
            assert (info["name"], info["nbytes"], info["state"]) == (e.name, e.data_size, int(e.state))
        assert any(kept[i]["extent_offset"] != before[i] for i in wanted)  # it had moved
        assert ExtentState.RESERVED in {ExtentState(e["state"]) for e in answer["extents"]}  # kept, as listed


# -- on a real cluster --------------------------------------------------------------------
def _die_at_progress(n: int) -> None:
    """Run in worker A: SIGKILL itself after the n-th chunk of its next compaction."""
    from worker_plugin import moves as worker_moves

    seen = []

    def hook(stage, journal):
        seen.append(stage)
        if seen.count("progress") == n:
            os.kill(os.getpid(), signal.SIGKILL)

    worker_moves.stage_hook = hook


def _insert(fabric, names, nbytes):
    for i, name in enumerate(names):
        fabric.insert(name, "moves", np.uint8, np.full(nbytes, i % 251, np.uint8))


def test_a_worker_killed_during_defragment_leaves_its_block_adoptable():

    with local_cluster(2) as cluster, Client(cluster) as client:
        fabric = start(client, mb=256)
        try:
            a = sorted(client.scheduler_info()["workers"])[0]
            names = [f"m/{i}" for i in range(12)]
            client.submit(_insert, fabric, names, 8 * MiB, workers=[a], pure=False).result()
            for name in names[0::2]:
                fabric.delete(name)
            client.run(_die_at_progress, 1, workers=[a])
            with pytest.raises(errors.WorkerLostError):
                fabric.defragment()
            for i, name in enumerate(names):
                if i % 2 == 0:
                    continue
                wait_for(
                    lambda n=name: fabric.get(n) is not None,
                    f"{name} to be readable",
                    ignoring=(errors.VariableUnavailableError,),
                )
                view = fabric.get(name)
                assert np.count_nonzero(view != i % 251) == 0, f"{name} reads wrong bytes"
                del view
        finally:
            fabric.shutdown()
