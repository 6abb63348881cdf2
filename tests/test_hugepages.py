"""Blocks in huge pages (``datafabric.hugepages``): made of them where the kernel allows,
mapped whole by the owner and by a reader in another process, and mapped at aligned
addresses whose lifetime is still that of the last buffer taken from them."""

from __future__ import annotations

import gc
import multiprocessing
import os
import platform
import uuid

import numpy as np
import pytest

from datafabric import hugepages
from datafabric.shm import Segment, new_block_name

MiB = 2**20


def _kernel_collapses() -> bool:
    """MADV_COLLAPSE (Linux 6.1) on shmem, which only ``shmem_enabled=deny`` refuses."""
    if hugepages.huge_page_size() is None:
        return False
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            denied = "[deny]" in f.read()
    except OSError:
        return False
    return (major, minor) >= (6, 1) and not denied


needs_collapse = pytest.mark.skipif(not _kernel_collapses(), reason="this kernel makes no huge pages of shmem")


def huge_mapped(address: int) -> tuple[int, int]:
    """(Rss, ShmemPmdMapped) in KiB of this process's mapping holding ``address``."""
    inside, figures = False, {}
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):
                low, high = (int(x, 16) for x in first.split("-"))
                inside = low <= address < high
            elif inside and line.endswith(" kB\n"):
                figures[first[:-1]] = int(line.split()[1])
    return figures["Rss"], figures["ShmemPmdMapped"]


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            low, high = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            if low <= address < high:
                return True
    return False


def read_in_another_process(name: str, answer) -> None:
    segment = Segment.attach(name)
    data = np.frombuffer(segment.readonly, np.uint64)
    total = int(data.sum())
    answer.put((total, segment.address % hugepages.huge_page_size(), *huge_mapped(segment.address)))
    del data
    segment.close()


@pytest.fixture
def block_name():
    name = new_block_name(uuid.uuid4(), "hugepages-test")
    yield name
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


@needs_collapse
def test_a_block_is_made_of_huge_pages_which_its_owner_and_a_reader_process_map_whole(block_name):
    size = 16 * MiB + 8192  # a tail smaller than one huge page keeps small pages
    owner = Segment.create(block_name, size)
    try:
        data = np.frombuffer(owner.buf, np.uint64)
        assert not data.any()  # the collapse's pages are zeros, like the small ones
        data[:] = np.arange(data.size, dtype=np.uint64)
        assert owner.address % hugepages.huge_page_size() == 0
        rss, huge = huge_mapped(owner.address)
        assert huge == 16 * 1024 and rss == size // 1024

        context = multiprocessing.get_context("spawn")
        answer = context.Queue()
        reader = context.Process(target=read_in_another_process, args=(block_name, answer))
        reader.start()
        total, misalignment, reader_rss, reader_huge = answer.get(timeout=60)
        reader.join(60)
        assert reader.exitcode == 0
        assert total == int(data.sum()) and misalignment == 0
        assert reader_huge == 16 * 1024 and reader_rss == size // 1024
        del data
    finally:
        owner.close()
        owner.unlink()


def test_a_view_keeps_an_aligned_mapping_after_close_and_unlink_and_its_death_unmaps_it(block_name):
    owner = Segment.create(block_name, 4 * MiB)
    np.frombuffer(owner.buf, np.uint8)[:] = 7
    reader = Segment.attach(block_name)
    view = np.frombuffer(reader.readonly, np.uint8)
    address = reader.address
    reader.close()
    owner.close()
    owner.unlink()
    assert mapped(address) and (view == 7).all()  # the view still holds the pages
    with pytest.raises(ValueError):
        view[0] = 1  # and is read-only
    del view
    gc.collect()
    assert not mapped(address)


def test_a_closed_segment_without_views_is_unmapped_at_once(block_name):
    owner = Segment.create(block_name, 4 * MiB)
    address = owner.address
    assert mapped(address)
    owner.close()
    assert not mapped(address)
    owner.unlink()
