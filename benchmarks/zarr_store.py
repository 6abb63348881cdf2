"""Reading a dataset with zarr through ``FabricStore``, against zarr over a ``LocalStore``
on /dev/shm holding the same array uncompressed, in the same run (medians of
``--rounds``; the ratio > 1 means the fabric is faster).  Both read ``z[:]`` into a new
array in this process, as zarr does: the fabric hands zarr each chunk's zero-copy view,
which zarr copies once into the result; the LocalStore reads each chunk file into
memory, and zarr copies that into the result.  Also ``da.from_zarr(...).sum()`` on the
workers through each store.

    python -m benchmarks.zarr_store [--gib 2] [--rounds 5] [--chunk-mib 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile

import dask.array as da
import zarr
from distributed import wait
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
        reads: dict[str, list[float]] = {name: [] for name in stores}
        sums: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(rounds):
            for name, (store, path) in stores.items():
                z = zarr.open_array(store=store, path=path, mode="r")
                reads[name].append(seconds(lambda z=z: z[:]))  # the result is dropped at once
                gc.collect()
                sums[name].append(seconds(lambda s=store, p=path: da.from_zarr(s, component=p).sum().compute()))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        fabric.delete("bench/zarr")
    read_med = {k: statistics.median(v) for k, v in reads.items()}
    sum_med = {k: statistics.median(v) for k, v in sums.items()}
    return {
        "gib": rows * COLUMNS * 8 / 2**30,
        "chunk_mib": chunk_rows * COLUMNS * 8 / 2**20,
        "read_seconds": read_med,
        "read_ratio": read_med["localstore"] / read_med["fabric"],
        "read_gib_per_s": {k: rows * COLUMNS * 8 / 2**30 / v for k, v in read_med.items()},
        "from_zarr_sum_seconds": sum_med,
        "from_zarr_sum_ratio": sum_med["localstore"] / sum_med["fabric"],
        "samples": {"read": reads, "from_zarr_sum": sums},
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
