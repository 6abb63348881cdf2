"""The on-memory format over real shared memory, no cluster: block headers, extent headers,
the move journal, and the walk.  ``BlockContract`` holds the tests; each subclass gives it
a kind of block (zarr's ``StoreTests`` pattern), so a new kind of block gets them all."""

from __future__ import annotations

import struct

import pytest

from datafabric import layout
from datafabric.layout import ExtentState
from tests.blocks import FABRIC, shm_block
from worker_plugin.allocator import BlockAllocator

MiB = 1 << 20


class BlockContract:
    size = 4 * MiB
    node = "unit-node"

    @pytest.fixture
    def segment(self):
        with shm_block(self.size, self.node) as segment:
            yield segment

    def test_header_round_trips_and_the_journal_starts_idle(self, segment):
        header = layout.read_block_header(segment.buf)
        assert (header.fabric_id, header.node, header.size) == (FABRIC, self.node, self.size)
        assert layout.read_journal(segment.buf) is None

    def test_a_fresh_block_walks_as_one_free_extent(self, segment):
        BlockAllocator(segment.buf, self.size, fresh=True)
        [free] = layout.walk(segment.buf)
        assert (free.offset, free.size, free.state) == (layout.BLOCK_HEADER_SIZE, self.size - 512, ExtentState.FREE)

    def test_extent_round_trips_with_its_id(self, segment):
        data = layout.write_extent(segment.buf, 512, ExtentState.SEALED, 8192, "n/ä", "10 * int8", "d", 10, 42)
        e = layout.read_extent(segment.buf, 512)
        assert (e.name, e.type, e.doc, e.data_size, e.extent_id, e.data_offset) == (
            "n/ä",
            "10 * int8",
            "d",
            10,
            42,
            data,
        )
        assert data % layout.ALIGN == 0

    def test_large_data_is_page_aligned(self, segment):
        data = layout.write_extent(segment.buf, 576, ExtentState.SEALED, 2 * MiB, "big", "", "", MiB, 7)
        assert data % layout.PAGE == 0

    def test_zeroed_memory_is_not_a_block(self, segment):
        segment.buf[:8] = bytes(8)
        with pytest.raises(layout.LayoutError, match="bad magic"):
            layout.read_block_header(segment.buf)

    def test_another_layout_version_is_refused(self, segment):
        struct.pack_into("<I", segment.buf, 8, 2)
        with pytest.raises(layout.LayoutError, match="layout version 2"):
            layout.read_block_header(segment.buf)

    def test_a_node_id_over_the_journal_is_refused(self, segment):
        header = layout.read_block_header(segment.buf)
        too_long = layout.BlockHeader(header.block_uuid, header.fabric_id, "n" * (layout.MAX_NODE_BYTES + 1), 1)
        with pytest.raises(ValueError, match="node id longer"):
            layout.write_block_header(segment.buf, too_long)

    def test_journal_round_trips_and_walk_refuses_an_unfinished_move(self, segment):
        BlockAllocator(segment.buf, self.size, fresh=True)
        layout.begin_move(segment.buf, source=8192, dest=4096, length=4096, chunk=4096)
        layout.record_progress(segment.buf, 4096)
        assert layout.read_journal(segment.buf) == layout.MoveJournal(8192, 4096, 4096, 4096, 4096)
        with pytest.raises(layout.LayoutError, match="unfinished"):
            list(layout.walk(segment.buf))
        layout.end_move(segment.buf)
        assert layout.read_journal(segment.buf) is None
        assert len(list(layout.walk(segment.buf))) == 1

    @pytest.mark.parametrize(
        ("source", "dest", "length", "chunk", "done"),
        [
            (4096, 8192, 4096, 4096, 0),  # moves up
            (8192, 100, 4096, 4096, 0),  # into the block header
            (8192, 4096, 4096, 8192, 0),  # chunks longer than the shift overwrite unread bytes
            (8192, 4096, 4096, 1024, 1000),  # progress between chunks
            (8192, 4096, 4096, 1024, 8192),  # more done than the length
            (8192, 4096, 1 << 40, 1024, 0),  # past the block's end
        ],
    )
    def test_a_journal_no_writer_would_write_is_refused(self, segment, source, dest, length, chunk, done):
        layout.begin_move(segment.buf, source, dest, length, chunk)
        layout.record_progress(segment.buf, done)
        with pytest.raises(layout.LayoutError, match="corrupt move journal"):
            layout.read_journal(segment.buf)


class TestSharedMemoryBlock(BlockContract):
    pass


class TestBlockWithTheLongestNodeId(BlockContract):
    size = 64 * 1024
    node = "n" * layout.MAX_NODE_BYTES
