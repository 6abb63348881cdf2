"""Builders of directory records for the tests of the YellowPages' Dask-free cores:
blocks, reservations, seal items and extent headers as their owners would report them."""

from __future__ import annotations

import itertools

from datafabric.layout import ExtentState
from datafabric.messages import ExtentInfo, Reservation, SealItem
from yp.directory import Directory
from yp.records import Block, Copy, Variable

CAPACITY = 1 << 20
_ids = itertools.count(1000)


def directory(*blocks: tuple[str, str, str | None]) -> Directory:
    """A directory with empty blocks, each ``(shm_id, node, worker)``."""
    d = Directory()
    for shm_id, node, worker in blocks:
        d.add_block(Block(shm_id, node, worker, CAPACITY + 4096, CAPACITY))
    return d


def reservation(offset: int, size: int = 256, extent_id: int | None = None) -> Reservation:
    extent_id = next(_ids) if extent_id is None else extent_id
    return {"extent_offset": offset, "extent_size": size, "data_offset": offset + 64, "extent_id": extent_id}


def seal_item(name: str, shm_id: str, offset: int, size: int = 256, extent_id: int | None = None) -> SealItem:
    r = reservation(offset, size, extent_id)
    return {"name": name, "doc": "", "type": "8 * uint8", "nbytes": 8, "shm_id": shm_id, **r}


def extent(copy: Copy, name: str = "", state: ExtentState = ExtentState.SEALED, **changes) -> ExtentInfo:
    e: ExtentInfo = {
        "extent_id": copy.extent_id,
        "extent_offset": copy.extent_offset,
        "extent_size": copy.extent_size,
        "data_offset": copy.data_offset,
        "state": int(state),
        "name": name,
        "type": "8 * uint8",
        "doc": "",
        "nbytes": 8,
    }
    return {**e, **changes}


def insert(d: Directory, name: str, shm_id: str = "A", offset: int = 0, size: int = 256) -> Variable:
    return d.seal(seal_item(name, shm_id, offset, size))


def ids(copies: list[Copy]) -> list[int]:
    return sorted(c.extent_id for c in copies)


def replica(d: Directory, var: Variable, shm_id: str, offset: int = 0) -> Copy:
    """A copy the fabric placed, filled and added, as a replication does."""
    copy = d.seal_pending_copy(
        shm_id, d.add_pending("datafabric-yellowpages", shm_id, reservation(offset)).extent_offset
    )
    d.add_copy(var, copy)
    return copy
