"""A block's pages: what making one costs, and what reading it costs, in huge pages (as
``Segment.create`` makes blocks where the kernel allows, ``datafabric.hugepages``)
against 4 KiB pages (a segment made as blocks were before: ``posix_fallocate`` and
``MADV_POPULATE_WRITE``, mapped by Python's ``mmap``), and a heap array, which numpy
puts in transparent huge pages.  In this process, no cluster:

- make: wall and CPU time of making a block of ``--mib``, the two kinds taking turns,
  ``--pause`` seconds apart: a fabric's ``allocate`` takes memory that was free for a
  while, which a VM may have handed back to its host (free page reporting) and must
  fault in again; memory freed a moment before is cheaper.
- read: the CPU time of this thread summing ``--mib`` through a fresh mapping (a
  reader's first read, page faults included) and then again and again (warm), the three
  sources taking turns pass by pass, so a loaded machine weighs on each alike.

    python -m benchmarks.blocks [--mib 256] [--rounds 8] [--pause 1] [--passes 40]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import time
import uuid
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from datafabric import hugepages
from datafabric.shm import _UNTRACKED, Segment, new_block_name

MADV_POPULATE_WRITE = 23


def _small_pages(name: str, size: int) -> SharedMemory:
    """A segment made as blocks were before huge pages."""
    shm = SharedMemory(name, create=True, size=size, **_UNTRACKED)
    os.posix_fallocate(shm._fd, 0, size)
    shm._mmap.madvise(MADV_POPULATE_WRITE)
    return shm


def bench_make(size: int, rounds: int, pause: float) -> dict:
    samples: dict[str, list[tuple[float, float]]] = {"huge": [], "small": []}
    for turn in range(rounds):
        for kind in ("huge", "small")[:: 1 if turn % 2 == 0 else -1]:
            t0, c0 = time.perf_counter(), os.times()
            if kind == "huge":
                made = Segment.create(new_block_name(uuid.uuid4(), "bench-blocks"), size)
            else:
                made = _small_pages(f"bench_blocks_{secrets.token_hex(8)}", size)
            t1, c1 = time.perf_counter(), os.times()
            made.close()
            made.unlink()
            time.sleep(pause)
            samples[kind].append((t1 - t0, c1.user + c1.system - c0.user - c0.system))
    return {
        kind: {"seconds": statistics.median(s for s, _ in v), "cpu_seconds": statistics.median(c for _, c in v)}
        for kind, v in samples.items()
    } | {"samples": samples}


def bench_read(size: int, passes: int) -> dict:
    name = new_block_name(uuid.uuid4(), "bench-blocks")
    owner = Segment.create(name, size)
    small = _small_pages(f"bench_blocks_{secrets.token_hex(8)}", size)
    try:
        data = np.random.default_rng(0).random(size // 8)
        np.frombuffer(owner.buf, np.float64)[:] = data
        np.frombuffer(small.buf, np.float64)[:] = data
        reader, small_reader = Segment.attach(name), SharedMemory(small.name, **_UNTRACKED)
        makers = {
            "huge": lambda: np.frombuffer(reader.readonly, np.float64),
            "small": lambda: np.frombuffer(small_reader.buf, np.float64),
            "heap": lambda: data.copy(),
        }
        first, arrays = {}, {}
        for kind, make in makers.items():
            t0 = time.thread_time()
            arrays[kind] = make()
            arrays[kind].sum()
            first[kind] = time.thread_time() - t0
        warm: dict[str, list[float]] = {kind: [] for kind in arrays}
        for _ in range(passes):
            for kind, array in arrays.items():
                t0 = time.thread_time()
                array.sum()
                warm[kind].append(time.thread_time() - t0)
        med = {kind: statistics.median(v) for kind, v in warm.items()}
        huge_mapped = hugepages.huge_page_size() is not None and reader.address % hugepages.huge_page_size() == 0
        del arrays
        reader.close()
        small_reader.close()
    finally:
        owner.close()
        owner.unlink()
        small.close()
        small.unlink()
    return {
        "first_sum_cpu_seconds": first,
        "warm_sum_cpu_seconds": med,
        "heap_over_huge": med["heap"] / med["huge"],
        "heap_over_small": med["heap"] / med["small"],
        "reader_mapping_aligned": huge_mapped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--passes", type=int, default=40)
    args = parser.parse_args()
    size = args.mib * 2**20
    made = bench_make(size, args.rounds, args.pause)
    summary = {k: v for k, v in made.items() if k != "samples"}
    print(json.dumps({"make": summary, "mib": args.mib, "pause": args.pause}), flush=True)
    print(json.dumps({"read": bench_read(size, args.passes), "mib": args.mib}), flush=True)
    print(json.dumps({"loadavg": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
