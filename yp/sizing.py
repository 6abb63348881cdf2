"""How one ``allocate`` splits a node's share among the node's workers.

Unequal on purpose.  A task's insert reserves in its own worker's block with no round trip,
so every worker needs a block of its own; but a variable must fit in one free piece, so an
even split would cap the largest variable at ``share / workers``.  So one worker of each
node (the one holding the least fabric memory, so that repeated allocations take turns)
gets ``share`` less the others' blocks, and each other worker a block of
``share / (LOCAL_SHARES * workers)``: the local blocks together take less than
``1 / LOCAL_SHARES`` of the share, and a variable of up to ``big_fraction(workers)`` of it
fits in one allocation's largest block.  A worker's small inserts that overflow its own
block are placed by the YellowPages (one round trip), best fit, so they fill the small
blocks before they cut into the large one.
"""

from __future__ import annotations

import math

from datafabric.errors import OutOfSpaceError
from datafabric.shm import round_to_pages
from yp.records import Block

LOCAL_SHARES = 4


def split(share: int, workers: list[str], held: dict[str, int]) -> list[tuple[str, int]]:
    """``(worker, block size)`` for each of ``workers`` (sorted), the large block first;
    ``held`` is the fabric memory each holds already.  The sizes add up to ``share``
    (rounded up to whole pages)."""
    big = min(workers, key=lambda w: (held.get(w, 0), w))
    others = [w for w in workers if w != big]
    local = round_to_pages(share // (LOCAL_SHARES * len(workers)))
    return [(big, round_to_pages(max(share - local * len(others), local)))] + [(w, local) for w in others]


def big_fraction(workers: int) -> float:
    """The part of a node's share that its large block gets."""
    return 1 - (workers - 1) / (LOCAL_SHARES * workers)


def mb_for(nbytes: int, nodes: int, workers: int) -> int:
    """The ``allocate`` (in MiB, over ``nodes`` nodes of ``workers`` workers each) whose
    large block on every node holds ``nbytes`` in one piece, with room for its header."""
    per_node = (nbytes + 2**20) / big_fraction(workers)
    return math.ceil(per_node * nodes / 2**20)


def out_of_space(blocks: list[Block], nbytes: int, node: str | None) -> OutOfSpaceError:
    """The refusal of a variable of ``nbytes`` that fits in no block (of ``node``), with
    advice that works: the ``allocate`` whose large block would hold it."""
    here = [b for b in blocks if node is None or b.node == node]
    where = f" on node {node}" if node is not None else ""
    if here and not any(b.worker for b in here):
        return OutOfSpaceError(
            f"no block{where} has a live owner now ({len(here)} wait for a worker of their node "
            "to adopt them); start a worker there, or call fabric.allocate(mb) to add memory"
        )
    free: dict[str, int] = {}
    workers: dict[str, set[str]] = {}
    for b in here:
        free[b.node] = free.get(b.node, 0) + b.free
        workers.setdefault(b.node, set()).add(b.worker)
    per_node = ", ".join(f"{n}: {f / 2**20:.1f} MiB" for n, f in sorted(free.items())) or "no blocks"
    nodes = len({b.node for b in blocks}) or 1
    mb = mb_for(nbytes, nodes, max((len(w) for w in workers.values()), default=1))
    return OutOfSpaceError(
        f"no block{where} has {_size(nbytes)} free in one piece (free per node: {per_node}); "
        f"delete variables, or call fabric.allocate({mb}), which adds a block that holds it on every node"
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"
