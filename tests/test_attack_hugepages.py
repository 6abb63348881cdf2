"""Attacks on blocks in huge pages mapped at aligned addresses (``datafabric/hugepages.py``,
``datafabric/shm.py``).  The promise: a mapping lives exactly as long as any buffer or
view of it, so nothing reads an unmapped address (a segfault kills the process: the risky
parts run in child processes, whose exit code says) and nothing is left mapped or in
/dev/shm; a full tmpfs is an error at ``Segment.create``, never a SIGBUS later."""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from datafabric import hugepages
from datafabric.errors import OutOfSpaceError
from datafabric.shm import Segment, fabric_segments, new_block_name
from tests.test_hugepages import mapped

MiB = 2**20
PAGE = 4096
SIZES = (MiB, 2 * MiB - 1, 2 * MiB, 2 * MiB + 1, 3 * MiB + PAGE + 1, 4 * MiB, 5 * MiB - 1)
ROOT = Path(__file__).resolve().parent.parent


def maps(prefix: str = "dfab_") -> set[str]:
    """This process's mappings of fabric segments, and its inaccessible anonymous ones (what
    an aligned mapping's reservation would leave if its trimming went wrong)."""
    with open("/proc/self/maps") as f:
        lines = [line.split() for line in f]
    return {
        " ".join(fields)
        for fields in lines
        if prefix in " ".join(fields[5:]) or (fields[1] == "---p" and len(fields) == 5)
    }


def segments_mapped(prefix: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if prefix in line]


def pattern(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def in_child(target, *args, method: str = "spawn") -> None:
    """Run ``target`` in a child process: a read of an unmapped address is its death."""
    process = multiprocessing.get_context(method).Process(target=target, args=args)
    process.start()
    process.join(120)
    assert process.exitcode == 0, f"{target.__name__} exited with {process.exitcode}"


def views_outlive_every_close(seed: int, pages: str) -> None:
    """Each size, attached and closed 30 times while views of every kind are kept (numpy
    views of ``readonly``, slices of the writable ``buf``, a ``memoryview`` cast), the
    owner closed and its segment unlinked: every view reads its bytes, and once all are
    dropped every mapping is gone.  ``pages``: "huge", or "refused" (the kernel refuses
    the collapse), or "unaligned" (no aligned mapping either: Python's own, as before)."""
    assert hugepages.huge_page_size() is not None
    if pages in ("refused", "unaligned"):
        hugepages.MADV_COLLAPSE = -1  # EINVAL, as from a kernel that has no such advice
    if pages == "unaligned":
        hugepages._LIBC = None
    for size in (MiB, *SIZES):  # the first round settles numpy's and the allocator's own maps
        before = maps()
        name = new_block_name(uuid.uuid4(), "attack-hugepages")
        owner = Segment.create(name, size)
        expected = pattern(size, seed + size)
        np.frombuffer(owner.buf, np.uint8)[:] = expected
        kept = []
        try:
            for i in range(30):
                reader = Segment.attach(name)
                assert reader.size == size
                ours = isinstance(reader._shm._mmap, hugepages.AlignedMapping)
                assert ours == (pages != "unaligned" and size >= 2 * MiB)
                assert reader.address % hugepages.huge_page_size() == 0 or not ours
                if i % 3 == 0:
                    kept.append((0, np.frombuffer(reader.readonly, np.uint8)))
                if i % 5 == 0:
                    kept.append((size // 2, reader.buf[size // 2 :]))
                if i % 7 == 0:
                    kept.append((size - 1, reader.readonly[size - 1 :].cast("B")))
                reader.close()
        finally:
            owner.close()
            owner.unlink()
        gc.collect()
        for start, view in kept:
            got = np.frombuffer(view, np.uint8)
            np.testing.assert_array_equal(got, expected[start:])
            del got
        del kept, view
        gc.collect()
        assert maps() == before, (size, maps() - before)


@pytest.mark.parametrize("pages", ["huge", "refused", "unaligned"])
def test_views_kept_past_close_and_unlink_over_many_attach_cycles_read_right_and_leave_no_mapping(pages):
    in_child(views_outlive_every_close, 3, pages)


def fork_reads_a_view_of_an_unlinked_segment(seed: int) -> None:
    """A view kept past close and unlink, inherited by forked children, which read it and
    exit; the parent reads it after them, and its death unmaps it."""
    size = 6 * MiB + 3 * PAGE
    name = new_block_name(uuid.uuid4(), "attack-hugepages")
    owner = Segment.create(name, size)
    expected = pattern(size, seed)
    np.frombuffer(owner.buf, np.uint8)[:] = expected
    view = np.frombuffer(owner.readonly, np.uint8)
    address = view.ctypes.data
    owner.close()
    owner.unlink()
    before = maps()
    for _ in range(3):
        in_child(check_sum, view, int(expected.astype(np.uint64).sum()), method="fork")
    assert maps() == before
    np.testing.assert_array_equal(view, expected)
    del view
    gc.collect()
    assert not mapped(address)


def check_sum(view: np.ndarray, total: int) -> None:
    assert int(view.astype(np.uint64).sum()) == total


def test_forked_children_read_and_drop_a_view_of_a_closed_unlinked_segment():
    in_child(fork_reads_a_view_of_an_unlinked_segment, 5)


def spawned_reader(name: str, total: int, ready, unlinked) -> None:
    segment = Segment.attach(name)
    view = np.frombuffer(segment.readonly, np.uint8)[PAGE:]
    segment.close()
    ready.set()
    assert unlinked.wait(60)
    assert int(view.astype(np.uint64).sum()) == total
    address = view.ctypes.data
    del view
    gc.collect()
    assert not mapped(address)


def test_a_spawned_reader_s_view_outlives_its_close_and_the_owner_s_unlink():
    size = 3 * MiB + 1
    name = new_block_name(uuid.uuid4(), "attack-hugepages")
    owner = Segment.create(name, size)
    try:
        expected = pattern(size, 11)
        np.frombuffer(owner.buf, np.uint8)[:] = expected
        context = multiprocessing.get_context("spawn")
        ready, unlinked = context.Event(), context.Event()
        total = int(expected[PAGE:].astype(np.uint64).sum())
        reader = context.Process(target=spawned_reader, args=(name, total, ready, unlinked))
        reader.start()
        assert ready.wait(120)
        owner.close()
        owner.unlink()
        unlinked.set()
        reader.join(120)
        assert reader.exitcode == 0
    finally:
        owner.close()
        owner.unlink()
    assert name not in fabric_segments()


def test_defragment_under_views_of_huge_page_blocks_keeps_checksums_and_shutdown_unmaps_after_the_last_view(client):
    """Views of variables in huge-page blocks are kept while their neighbours are deleted
    and the block compacted (moves into the same mapping), while their blocks are
    deallocated (the variables migrate; the client detaches the blocks), while the fabric
    shuts down and after: each reads its bytes throughout, and dropping the last leaves no mapping."""
    import datafabric

    fabric = datafabric.start(client, mb=16)
    fabric_id = uuid.UUID(fabric.fabric_id)
    ours = f"dfab_{fabric_id.hex[:8]}"
    rng = np.random.default_rng(17)
    data = {f"hp/{i}": rng.random(int(rng.integers(1, 40_000))) for i in range(40)}
    for name, array in data.items():
        fabric.insert(name, "", np.float64, array)
    views = {name: fabric.get(name) for name in data}
    for name in list(data)[::2]:
        fabric.delete(name)
    del data  # only the views' copies are checked from here: ``data`` was the source
    sums = {name: float(v.sum()) for name, v in views.items()}
    fabric.defragment()
    for name in list(views)[1::2]:
        moved = fabric.get(name)
        assert float(moved.sum()) == sums[name] and float(views[name].sum()) == sums[name], name
        del moved
    fabric.allocate(16)  # a second block per worker: the first ones' variables migrate there
    for node, shm_id in [(b["node"], b["shm_id"]) for b in fabric.status() if b["used"]]:
        fabric.deallocate(node, shm_id, migrate=True)  # unlinked and detached under the views
    for name in list(views)[1::2]:
        migrated = fabric.get(name)
        assert float(migrated.sum()) == sums[name] and float(views[name].sum()) == sums[name], name
        del migrated
    fabric.shutdown()
    assert not fabric_segments(fabric_id) and segments_mapped(ours)
    for name, view in views.items():
        assert float(view.sum()) == sums[name], name
    del views, view
    gc.collect()
    assert not segments_mapped(ours)


def fill_a_small_tmpfs(huge: str) -> None:
    """Inside a private 64 MiB tmpfs: segments of odd sizes up to its last page are made,
    every byte written (no SIGBUS), then one more is refused at ``create`` leaving nothing."""
    made = []
    try:
        for size in (5 * MiB + 1, 2 * MiB - PAGE, 7 * MiB + 3 * PAGE):
            made.append(Segment.create(new_block_name(uuid.uuid4(), "tmpfs"), size))
        while True:
            st = os.statvfs("/dev/shm")
            free = st.f_bavail * st.f_frsize
            size = min(free - PAGE // 2, 9 * MiB + PAGE + 7)
            if size < PAGE:
                break
            try:
                made.append(Segment.create(new_block_name(uuid.uuid4(), "tmpfs"), size))
            except OutOfSpaceError:
                assert huge == "always", "refused though it fit"  # rounded to huge pages, it does not
                break
        for k, segment in enumerate(made):
            np.frombuffer(segment.buf, np.uint8)[:] = k + 1
        names = set(fabric_segments())
        with pytest.raises(OutOfSpaceError):
            Segment.create(new_block_name(uuid.uuid4(), "tmpfs"), 3 * MiB)
        assert set(fabric_segments()) == names
        for k, segment in enumerate(made):
            assert (np.frombuffer(Segment.attach(segment.name).readonly, np.uint8) == k + 1).all()
    finally:
        for segment in made:
            segment.close()
            segment.unlink()
    assert fabric_segments() == []
    print("filled", len(made), flush=True)


@pytest.mark.parametrize("huge", ["never", "always"])
def test_a_tmpfs_filled_to_its_last_page_with_odd_sizes_is_an_error_at_create(huge):
    unshare = shutil.which("unshare")
    namespace = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c"]
    mount = f"mount -t tmpfs -o size=64m,huge={huge},mode=1777 tmpfs /dev/shm"
    if unshare is None or subprocess.run([*namespace, mount], capture_output=True).returncode:
        pytest.skip("needs unshare, user namespaces and a tmpfs mount in them")
    code = f"import tests.test_attack_hugepages as t; t.fill_a_small_tmpfs({huge!r})"
    done = subprocess.run(
        [*namespace, f'{mount} && exec "{sys.executable}" -c "{code}"'],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout[-2000:]} {done.stderr[-4000:]}"
    assert "filled" in done.stdout
