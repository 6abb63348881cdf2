"""Real shared-memory blocks for the unit tests of the layout and the allocator, with
extents whose bytes are drawn from their extent id, so that any byte moved wrong shows."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import numpy as np

from datafabric import layout
from datafabric.layout import BlockHeader, ExtentState
from datafabric.shm import Segment, new_block_name
from worker_plugin.allocator import BlockAllocator

FABRIC = uuid.UUID(int=0x5EED)
NODE = "unit-node"


@contextlib.contextmanager
def shm_block(size: int, node: str = NODE) -> Iterator[Segment]:
    """A pre-faulted segment with a block header of ``size`` bytes, unlinked afterwards."""
    segment = Segment.create(new_block_name(FABRIC, node), size)
    try:
        layout.write_block_header(segment.buf, BlockHeader(uuid.uuid4(), FABRIC, node, size))
        yield segment
    finally:
        segment.unlink()
        segment.close()


def pattern(extent_id: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(extent_id).integers(0, 256, nbytes, dtype=np.uint8)


def put(segment: Segment, allocator: BlockAllocator, name: str, nbytes: int, seal: bool = True) -> int:
    """Reserve, fill with the extent's pattern, seal; return the extent id."""
    r = allocator.reserve(name, f"{nbytes} * uint8", f"doc of {name}", nbytes)
    assert r is not None, f"no room for {nbytes} bytes"
    np.frombuffer(segment.buf, np.uint8, nbytes, r.data_offset)[:] = pattern(r.extent_id, nbytes)
    if seal:
        allocator.set_state(r.offset, ExtentState.SEALED)
    return r.extent_id


def check_block(segment: Segment, allocator: BlockAllocator, expected: dict[int, str] | None = None) -> dict:
    """The invariants every block keeps: extents tile it, no two free ones touch, the walk
    is the allocator's index, every extent is ALIGN-aligned with its data aligned as its
    size wants, and every extent holds exactly its pattern.  ``expected`` maps the extent
    ids that must be there to their names.  Returns ``{extent id: Extent}``."""
    walked = list(layout.walk(segment.buf, allocator.size))
    assert [(e.offset, e.size, e.state) for e in walked] == allocator.extents()
    offset = layout.BLOCK_HEADER_SIZE
    for prev, e in zip([None, *walked], walked, strict=False):
        assert e.offset == offset and e.offset % layout.ALIGN == 0 and e.size % layout.ALIGN == 0
        assert not (prev is not None and prev.state is ExtentState.FREE and e.state is ExtentState.FREE)
        offset += e.size
    assert offset == allocator.size
    assert allocator.free_bytes == sum(e.size for e in walked if e.state is ExtentState.FREE)
    found = {}
    for e in walked:
        if e.state is ExtentState.FREE:
            continue
        to = layout.PAGE if e.data_size >= layout.PAGE_ALIGN_FROM else layout.ALIGN
        assert e.data_offset % to == 0 and e.data_offset + e.data_size <= e.offset + e.size
        assert e.extent_id not in found, f"extent {e.extent_id} twice"
        data = np.frombuffer(segment.buf, np.uint8, e.data_size, e.data_offset)
        wrong = np.count_nonzero(data != pattern(e.extent_id, e.data_size))
        assert not wrong, f"{e.name}: {wrong} of {e.data_size} bytes differ"
        found[e.extent_id] = e
    if expected is not None:
        assert {i: e.name for i, e in found.items()} == expected
    return found
