"""Chunked datasets on the 2-worker cluster, each against a same-run baseline (medians of
``--rounds``; ratios > 1 mean the fabric is faster):

- ``ds.to_dask().sum()`` of a dataset of ``--gib`` GiB in 16 MiB chunks, against the same
  dask array persisted in worker memory, and against ``da.from_zarr`` of an uncompressed
  zarr store on /dev/shm; and the workers' USS growth during the fabric's read; the tasks
  each graph runs; and, in a worker, the sum of one chunk's view against a heap copy of it
  (numpy's large arrays get transparent huge pages; blocks get them through
  ``MADV_COLLAPSE`` where the kernel allows, and the part of the block's mapping in
  huge pages is printed: what the page size alone costs); and the CPU time the workers
  and the scheduler spend on each sum, steadier than wall time on a loaded machine.
- ``fabric.from_dask`` of a computed array against ``array.persist()`` of the same.
- a warm ``ds[sel]`` inside one chunk in the client; the first read of a chunk in a task,
  beside the fabric's cold get of a variable of the same size.
- the scheduler's memory per chunk of a dataset of ``--chunks`` chunks (tracemalloc on the
  scheduler, everything its write and seal leave behind), and the YellowPages' own
  records per chunk of a sealed 100,000-chunk dataset, measured in this process: in
  columns, as the seal keeps them, against the same chunks as ordinary variables.

    python -m benchmarks.datasets [--gib 2] [--rounds 3] [--chunks 20000] [--parts sum,from_dask,reads,scheduler]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc

import dask.array as da
import numpy as np
import psutil
from distributed import wait

from benchmarks.cluster import fabric_on, local_cluster
from benchmarks.timing import per_call_ns, seconds

CHUNK = 16 * 2**20


def _uss() -> int:
    return psutil.Process().memory_full_info().uss


def _source(gib: float) -> da.Array:
    rows = int(gib * 2**30 / 8 / 2048)
    return da.random.default_rng(1).random((rows, 2048), chunks=(CHUNK // 8 // 2048, 2048))


def bench_sum(client, fabric, gib: float, rounds: int) -> dict:
    x = _source(gib)
    ds = fabric.from_dask("bench/sum", x)
    persisted = x.persist()
    wait(persisted)
    store = tempfile.mkdtemp(dir="/dev/shm", prefix="bench_zarr_")
    try:
        import zarr

        z = zarr.create_array(store, shape=x.shape, chunks=x.chunksize, dtype=x.dtype, compressors=None)
        da.store(persisted, z, lock=False)
        timings = {"fabric": [], "persisted": [], "zarr": []}
        cpu = {"fabric": [], "persisted": []}
        uss_growth = []
        for _ in range(rounds):
            before, cpu0 = client.run(_uss), _cluster_cpu(client)
            timings["fabric"].append(seconds(lambda: ds.to_dask().sum().compute()))
            after, cpu1 = client.run(_uss), _cluster_cpu(client)
            uss_growth.append(max(after[w] - before[w] for w in before))
            timings["persisted"].append(seconds(lambda: persisted.sum().compute()))
            cpu2 = _cluster_cpu(client)
            cpu["fabric"].append(cpu1 - cpu0)
            cpu["persisted"].append(cpu2 - cpu1)
            timings["zarr"].append(seconds(lambda: da.from_zarr(store).sum().compute()))
        tasks = {"fabric": _task_count(ds.to_dask().sum()), "persisted": _task_count(persisted.sum())}
        chunk_sum = client.submit(_chunk_sum, ds, pure=False).result()
    finally:
        shutil.rmtree(store, ignore_errors=True)
        client.cancel(persisted)
        fabric.delete("bench/sum")
    med = {k: statistics.median(v) for k, v in timings.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "seconds": med,
        "vs_persisted": med["persisted"] / med["fabric"],
        "cpu_seconds": cpu_med,  # workers' and scheduler's, steadier than wall time on a loaded machine
        "cpu_vs_persisted": cpu_med["persisted"] / cpu_med["fabric"],
        "vs_zarr": med["zarr"] / med["fabric"],
        "uss_growth_fraction": max(uss_growth) / ds.nbytes,
        "tasks": tasks,
        "chunk_sum": chunk_sum,
        "samples": timings,
    }


def _task_count(array: da.Array) -> int:
    """Tasks the scheduler runs for ``array`` once optimised (an ``Alias`` is one too)."""
    return len(array.__dask_optimize__(array.__dask_graph__(), array.__dask_keys__()))


def _cluster_cpu(client) -> float:
    """CPU seconds the workers and the scheduler have used so far, in all."""

    def used() -> float:
        t = os.times()
        return t.user + t.system

    return sum(client.run(used).values()) + client.run_on_scheduler(used)


def _chunk_sum(ds) -> dict:
    """In a worker: sums of 16 chunks' shared-memory views (256 MiB, past any cache)
    against sums of private copies of them in the heap, the CPU time of this thread (a
    loaded machine's waits left out), medians of 15 passes taking turns.  numpy asks
    for transparent huge pages for its large arrays; a block has them where the kernel
    let ``MADV_COLLAPSE`` make them (``datafabric.hugepages``), so this is what the pages
    alone cost a read of the same bytes, beside how much of the block is mapped in them."""
    views = [ds.chunk(i) for i in itertools.islice(np.ndindex(*ds._grid), 16)]
    heaps = [np.array(v) for v in views]

    def sum_all(arrays: list) -> None:
        for a in arrays:
            a.sum()

    def cpu_seconds(arrays: list) -> float:
        t0 = time.thread_time()
        sum_all(arrays)
        return time.thread_time() - t0

    sum_all(views), sum_all(heaps)  # faulted in, both
    passes = [(cpu_seconds(views), cpu_seconds(heaps)) for _ in range(15)]  # interleaved: the same load on both
    shm_s = statistics.median(p[0] for p in passes) / len(views)
    heap_s = statistics.median(p[1] for p in passes) / len(views)
    huge = _huge_mapped_fraction(views[0].ctypes.data)
    return {
        "shm_ms": shm_s * 1e3,
        "heap_ms": heap_s * 1e3,
        "heap_over_shm": heap_s / shm_s,
        "shm_huge_mapped_fraction": huge,
        **_thp(),
    }


def _huge_mapped_fraction(address: int) -> float | None:
    """Of this process's mapping holding ``address`` (a block), the part mapped in huge
    pages (``ShmemPmdMapped`` of /proc/self/smaps over its ``Rss``)."""
    inside, figures = False, {}
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if not first.endswith(":"):  # a mapping's first line: its address range
                    low, high = (int(x, 16) for x in first.split("-"))
                    inside = low <= address < high
                elif inside and line.endswith(" kB\n"):
                    figures[first[:-1]] = int(line.split()[1])
    except OSError:
        return None
    return figures.get("ShmemPmdMapped", 0) / figures["Rss"] if figures.get("Rss") else None


def _thp() -> dict:
    out = {}
    for key, path in (("thp", "enabled"), ("shmem_thp", "shmem_enabled")):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{path}") as f:
                out[key] = f.read().split("[")[1].split("]")[0]
        except (OSError, IndexError):
            out[key] = "unknown"
    return out


def bench_from_dask(client, fabric, gib: float, rounds: int) -> dict:
    timings = {"from_dask": [], "persist": []}
    for i in range(rounds):
        x = _source(gib) + 1
        timings["from_dask"].append(seconds(lambda x=x, i=i: fabric.from_dask(f"bench/fd{i}", x)))
        fabric.delete(f"bench/fd{i}")

        def persist(x=x) -> None:
            p = x.persist()
            wait(p)
            del p

        timings["persist"].append(seconds(persist))
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {"seconds": med, "ratio": med["persist"] / med["from_dask"], "samples": timings}


def _first_chunk_read(ds, flat: int) -> float:
    t0 = time.perf_counter_ns()
    view = ds._views([flat])[0]
    view.flat[0]
    return (time.perf_counter_ns() - t0) / 1e3


def _cold_get(fabric, name: str) -> float:
    t0 = time.perf_counter_ns()
    view = fabric.get(name)
    view.flat[0]
    return (time.perf_counter_ns() - t0) / 1e3


def bench_reads(client, fabric) -> dict:
    x = _source(0.25)
    ds = fabric.from_dask("bench/reads", x)
    held = ds[0:10, 0:10]
    warm = statistics.median(per_call_ns(lambda: ds[3:7, 100:200], 2000)) / 1e3
    del held
    worker = sorted(client.scheduler_info()["workers"])[0]
    firsts = [client.submit(_first_chunk_read, ds, flat, workers=[worker], pure=False).result() for flat in range(8)]
    for i in range(8):
        fabric.insert(f"bench/var{i}", "", np.float64, np.ones(CHUNK // 8))
    colds = [client.submit(_cold_get, fabric, f"bench/var{i}", workers=[worker], pure=False).result() for i in range(8)]
    for i in range(8):
        fabric.delete(f"bench/var{i}")
    fabric.delete("bench/reads")
    return {"warm_us": warm, "first_chunk_read_us": statistics.median(firsts), "cold_get_us": statistics.median(colds)}


def _trace(dask_scheduler, start: bool) -> int:
    gc.collect()
    if start:
        tracemalloc.start()
        return 0
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current


def bench_scheduler_memory(client, fabric, chunks: int) -> dict:
    ds = fabric.create_dataset("bench/many", (chunks,), np.int8, chunks=1)
    client.run_on_scheduler(_trace, start=True)
    t0 = time.perf_counter()
    ds[...] = np.ones(chunks, np.int8)
    ds.seal()
    seconds_taken = time.perf_counter() - t0
    grown = client.run_on_scheduler(_trace, start=False)
    fabric.delete("bench/many")
    return {"chunks": chunks, "bytes_per_chunk": grown / chunks, "write_and_seal_seconds": seconds_taken}


def directory_bytes_per_chunk(chunks: int = 100_000) -> dict:
    """The YellowPages' records of a sealed dataset's chunks, built in this process as the
    seal builds them: in columns (``yp/chunk_columns.py``) and the chunk table, against the
    same chunks as ordinary variables (one ``Variable``, ``Copy`` and name each), the
    records every chunk had before and one has once a protocol materialises it."""
    from datafabric.names import chunk_name
    from yp.directory import Directory
    from yp.records import Block, Copy

    def home(f: int) -> Copy:
        return Copy("b", 4096 * f, 4096, 4096 * f + 512, 2**60 + f)

    def measure(build) -> float:
        d = Directory()
        d.add_block(Block("b", "node", "worker", 2**50, 2**50))
        homes = {f: home(f) for f in range(chunks)}  # the seal's input, not counted
        gc.collect()
        tracemalloc.start()
        kept = build(d, homes)
        del homes
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        return grown / chunks

    def columns(d: Directory, homes: dict) -> np.ndarray:
        cols = d.seal_chunks(d.first_id, "node", lambda flat: "16 * 16 * float64", homes)
        table = np.full(chunks, -1, np.int64)
        table[cols.flats] = cols.first_id + np.arange(len(cols), dtype=np.int64)
        return table

    def variables(d: Directory, homes: dict) -> list:
        items = [
            {
                "name": chunk_name(d.first_id, f),  # in the YellowPages names arrive in messages
                "doc": "",
                "type": "16 * 16 * float64",
                "nbytes": 2048,
                "shm_id": "b",  # offsets as a message brings them: new ints
                "extent_offset": 4096 * f,
                "extent_size": 4096,
                "data_offset": 4096 * f + 512,
                "extent_id": 2**60 + f,
            }
            for f in homes
        ]
        sealed = d.seal_all(items)
        table = np.array([v.var_id for v in sealed], np.int64)
        del sealed, items
        return table

    columnar, objects = measure(columns), measure(variables)
    return {
        "chunks": chunks,
        "bytes_per_chunk": columnar,
        "as_variables_bytes_per_chunk": objects,
        "ratio": objects / columnar,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--parts", default="sum,from_dask,reads,scheduler", help="which measurements, comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results = {"directory": directory_bytes_per_chunk()}
    print(json.dumps({"directory": results["directory"]}), flush=True)
    with local_cluster(2) as (_, client), fabric_on(client, mb=int(args.gib * 1024 * 1.25) + 512) as fabric:
        runs = {
            "sum": lambda: bench_sum(client, fabric, args.gib, args.rounds),
            "from_dask": lambda: bench_from_dask(client, fabric, args.gib, args.rounds),
            "reads": lambda: bench_reads(client, fabric),
            "scheduler": lambda: bench_scheduler_memory(client, fabric, args.chunks),
        }
        for part, run in runs.items():
            if part in parts:
                results[part] = run()
                print(json.dumps({part: {k: v for k, v in results[part].items() if k != "samples"}}), flush=True)


if __name__ == "__main__":
    main()
