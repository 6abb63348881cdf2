"""Reading a dataset with zarr through ``FabricStore``, against zarr over a ``LocalStore``
on /dev/shm holding the same array uncompressed, in the same run (medians of
``--rounds``; the ratio > 1 means the fabric is faster).  Both read ``z[:]`` into a new
array in this process, as zarr does: the fabric hands zarr each chunk's zero-copy view,
which zarr copies once into the result; the LocalStore reads each chunk file into
memory, and zarr copies that into the result.  Also ``da.from_zarr(...).sum()`` on the
workers through each store.

``z[:]`` gets its result from fresh memory, whose page faults (the kernel zeroing it) are
most of a read and swing from round to round with the machine's free memory (in a VM
whose free pages are reported to the host, fresh memory may first be faulted in by the
host), the same for both stores.  So each read's CPU time in this process, user and
system apart, is recorded, and a second read takes the result in an array made and
touched once before the rounds, the same one for both stores (``out=``): what the store
and zarr's copy cost alone.  A third read comes right after an array of the result's
size was written and freed in this process, the same for both stores: the kernel then
hands zarr's result pages that were just in use, not pages the host took back.  The
stores take turns going first from one round to the next, so neither always reads
after the other freed its memory.

    python -m benchmarks.zarr_store [--gib 2] [--rounds 5] [--chunk-mib 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile

import dask.array as da
import numpy as np
import zarr
from distributed import wait
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from benchmarks.cluster import fabric_on, local_cluster
from benchmarks.timing import seconds
from datafabric.zarr import FabricStore

COLUMNS = 2048


def bench(client, fabric, gib: float, rounds: int, chunk_mib: float) -> dict:
    rows = int(gib * 2**30 / 8 / COLUMNS)
    chunk_rows = max(1, int(chunk_mib * 2**20 / 8 / COLUMNS))
    source = da.random.default_rng(1).random((rows, COLUMNS), chunks=(chunk_rows, COLUMNS)).persist()
    wait(source)
    fabric.from_dask("bench/zarr", source)
    directory = tempfile.mkdtemp(dir="/dev/shm", prefix="bench_zarr_")
    try:
        local = zarr.create_array(LocalStore(directory), shape=source.shape, chunks=source.chunksize,
                                  dtype=source.dtype, compressors=None)  # fmt: skip
        da.store(source, local, lock=False)
        client.cancel(source)
        stores = {"fabric": (FabricStore(fabric), "bench/zarr"), "localstore": (LocalStore(directory), None)}
        out = np.ones(source.shape, source.dtype)  # touched: its pages are in place for every round
        into = default_buffer_prototype().nd_buffer.from_numpy_array(out)
        reads: dict[str, list[float]] = {name: [] for name in stores}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
        reads_into: dict[str, list[float]] = {name: [] for name in stores}
        reads_warm: dict[str, list[float]] = {name: [] for name in stores}
        sums: dict[str, list[float]] = {name: [] for name in stores}
        for turn in range(rounds):
            for name in list(stores)[:: 1 if turn % 2 == 0 else -1]:
                store, path = stores[name]
                z = zarr.open_array(store=store, path=path, mode="r")
                before = os.times()
                reads[name].append(seconds(lambda z=z: z[:]))  # the result is dropped at once
                after = os.times()
                cpu[name].append((after.user - before.user, after.system - before.system))
                gc.collect()
                np.ones(source.shape, source.dtype)  # written and freed: the next fresh memory was just in use
                reads_warm[name].append(seconds(lambda z=z: z[:]))
                gc.collect()
                reads_into[name].append(seconds(lambda z=z: z.get_basic_selection(..., out=into)))
                sums[name].append(seconds(lambda s=store, p=path: da.from_zarr(s, component=p).sum().compute()))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        fabric.delete("bench/zarr")
    nbytes = rows * COLUMNS * 8
    read_med = {k: statistics.median(v) for k, v in reads.items()}
    warm_med = {k: statistics.median(v) for k, v in reads_warm.items()}
    into_med = {k: statistics.median(v) for k, v in reads_into.items()}
    sum_med = {k: statistics.median(v) for k, v in sums.items()}
    return {
        "gib": nbytes / 2**30,
        "chunk_mib": chunk_rows * COLUMNS * 8 / 2**20,
        "read_seconds": read_med,
        "read_ratio": read_med["localstore"] / read_med["fabric"],
        "read_gib_per_s": {k: nbytes / 2**30 / v for k, v in read_med.items()},
        "read_cpu_user_system_seconds": {
            k: [statistics.median(u for u, _ in v), statistics.median(s for _, s in v)] for k, v in cpu.items()
        },
        "read_after_memory_in_use_seconds": warm_med,
        "read_after_memory_in_use_ratio": warm_med["localstore"] / warm_med["fabric"],
        "read_into_touched_seconds": into_med,
        "read_into_touched_ratio": into_med["localstore"] / into_med["fabric"],
        "from_zarr_sum_seconds": sum_med,
        "from_zarr_sum_ratio": sum_med["localstore"] / sum_med["fabric"],
        "loadavg": os.getloadavg(),
        "samples": {
            "read": reads,
            "read_cpu": cpu,
            "read_after_memory_in_use": reads_warm,
            "read_into_touched": reads_into,
            "from_zarr_sum": sums,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-mib", type=float, default=16.0)
    args = parser.parse_args()
    with local_cluster(2) as (_, client), fabric_on(client, mb=int(args.gib * 1024 * 1.25) + 512) as fabric:
        print(json.dumps(bench(client, fabric, args.gib, args.rounds, args.chunk_mib)), flush=True)


if __name__ == "__main__":
    main()
