"""The import of an HDF5 dataset into the fabric against h5py reading it into numpy, in
the same run (medians of ``--rounds``; ratios > 1 mean the fabric is faster):

- ``fabric``: ``datafabric.files.import_file`` of the dataset (what ``datafabric put NAME
  file.h5:/x`` runs, less the command's start-up), in this client process on the
  fabric's machine: each chunk read by h5py straight into its shared memory, then sealed.
- ``h5py``: ``f["x"][...]``, the whole dataset read into a new numpy array.
- ``h5py_into``: ``read_direct`` into an array allocated and touched beforehand: the copy
  alone, without the page faults of fresh memory.
- ``bare_shm``: ``read_direct`` into a fresh file on /dev/shm, mapped: the bare copy into
  new shared memory (its page faults included), the floor of what the import can cost
  (the fabric's own part is the rest: round trips, placements, the seal).

The file (float64, ``--gib`` GiB, 2048 columns) is written once per layout, contiguous
and chunked in 16 MiB chunks, into a temporary directory (``--dir``), and read once
before timing, so every read is from the page cache.  The fabric is emptied between
rounds (the import's dataset deleted).

    python -m benchmarks.import_h5 [--gib 2] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import h5py
import numpy as np

from benchmarks.cluster import fabric_on, local_cluster
from benchmarks.timing import seconds
from datafabric.files import import_file

COLUMNS = 2048
CHUNK_ROWS = 16 * 2**20 // 8 // COLUMNS  # 16 MiB chunks


def write_file(path: Path, gib: float, chunked: bool) -> int:
    rows = int(gib * 2**30 / 8 / COLUMNS)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", (rows, COLUMNS), "f8", chunks=(CHUNK_ROWS, COLUMNS) if chunked else None)
        rng = np.random.default_rng(1)
        for start in range(0, rows, CHUNK_ROWS):
            stop = min(rows, start + CHUNK_ROWS)
            ds[start:stop] = rng.random((stop - start, COLUMNS))
    return rows * COLUMNS * 8


def _bare_shm(dset) -> float:
    """Seconds of ``read_direct`` into a new mapping of a fresh /dev/shm file."""
    fd, name = tempfile.mkstemp(dir="/dev/shm", prefix="bench_import_h5_")
    try:
        os.ftruncate(fd, dset.size * dset.dtype.itemsize)
        out = np.memmap(name, dset.dtype, "r+", shape=dset.shape)
        return seconds(lambda: dset.read_direct(out))
    finally:
        os.close(fd)
        os.unlink(name)


def bench_layout(fabric, path: Path, rounds: int) -> dict:
    with h5py.File(path, "r") as f:
        f["x"][...]  # into the page cache
        shape = f["x"].shape
    into = np.ones(shape)
    timings: dict[str, list[float]] = {"fabric": [], "h5py": [], "h5py_into": [], "bare_shm": []}
    for _ in range(rounds):
        timings["fabric"].append(seconds(lambda: import_file(fabric, "bench/import", f"{path}:/x")))
        fabric.delete("bench/import")
        with h5py.File(path, "r") as f:
            timings["h5py"].append(seconds(lambda f=f: f["x"][...]))
            timings["h5py_into"].append(seconds(lambda f=f: f["x"].read_direct(into)))
            timings["bare_shm"].append(_bare_shm(f["x"]))
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "seconds": med,
        "vs_h5py": med["h5py"] / med["fabric"],
        "vs_h5py_into": med["h5py_into"] / med["fabric"],
        "vs_bare_shm": med["bare_shm"] / med["fabric"],
        "samples": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the HDF5 files are written (default: the temp dir)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_import_h5_", dir=args.dir))
    results = {"gib": args.gib, "rounds": args.rounds}
    try:
        with local_cluster(2) as (_, client), fabric_on(client, mb=int(args.gib * 1024 * 1.25) + 256) as fabric:
            for layout in ("contiguous", "chunked"):
                path = directory / f"{layout}.h5"
                results[f"{layout}_bytes"] = write_file(path, args.gib, chunked=layout == "chunked")
                results[layout] = bench_layout(fabric, path, args.rounds)
                path.unlink()
                summary = {k: v for k, v in results[layout].items() if k != "samples"}
                print(json.dumps({layout: summary}), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
