"""What numpy's wider dtypes cost: big-endian, datetime64 and packed, aligned and nested
records, against native float64 in the same run.

- Typing: ``from_dtype`` of each dtype, uncached (the fabric caches per process, so this
  is paid once per process and type), in µs per call, in this process.
- Insert: a variable of ``--mb`` MiB inserted in a task on A, in GB/s: the bytes are copied
  the same way whatever their dtype, so the ratio to float64 should be about 1.
- First get: the first ``get`` of it in a task on B (RPC, lease, mapping, the dtype built
  from the stored string), in µs.
- 1 KiB inserts in a loop in a task on A, in objects per second: where per-call type
  handling would show.

    python -m benchmarks.dtypes [--mb 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np

import datafabric
from benchmarks.cluster import fabric_on, local_cluster, workers
from datafabric import types

DTYPES = {
    "float64 (baseline)": np.dtype("f8"),
    ">f8": np.dtype(">f8"),
    "M8[ns]": np.dtype("M8[ns]"),
    "packed record": np.dtype([("a", "i1"), ("b", "f4", (4,)), ("c", ">i8")]),
    "aligned record": np.dtype([("a", "i1"), ("b", "f4", (4,)), ("c", ">i8")], align=True),
    "nested record": np.dtype([("id", ">u8"), ("t", "M8[ms]"), ("pos", [("x", ">f4"), ("y", "f4")], (2,))]),
}


def typing_us(dtype: np.dtype, calls: int) -> float:
    """Median µs of one uncached ``from_dtype`` (spelling, ndtypes, layout, checks)."""
    samples = []
    for _ in range(calls):
        types._from_numpy.cache_clear()
        types.from_datashape.cache_clear()
        t0 = time.perf_counter_ns()
        types.from_dtype(dtype, (1000,))
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(samples)


def of_bytes(dtype: np.dtype, nbytes: int) -> np.ndarray:
    count = nbytes // dtype.itemsize
    return np.ones(count * dtype.itemsize, np.uint8).view(dtype)


def insert_seconds(fabric: datafabric.Fabric, name: str, dtype: np.dtype, nbytes: int) -> float:
    data = of_bytes(dtype, nbytes)
    t0 = time.perf_counter()
    fabric.insert(name, "", dtype, data)
    return time.perf_counter() - t0


def first_get_us(fabric: datafabric.Fabric, name: str) -> float:
    t0 = time.perf_counter_ns()
    view = fabric.get(name)
    view.reshape(-1)[:1].tobytes()
    return (time.perf_counter_ns() - t0) / 1e3


def small_per_second(fabric: datafabric.Fabric, label: str, dtype: np.dtype, n: int) -> float:
    data, numbers = of_bytes(dtype, 1024), itertools.count()
    fabric.insert(f"small/{label}/warm", "", dtype, data)
    t0 = time.perf_counter()
    for _ in range(n):
        fabric.insert(f"small/{label}/{next(numbers)}", "", dtype, data)
    return n / (time.perf_counter() - t0)


def run(nbytes: int, reps: int, small: int) -> dict:
    result: dict = {"typing_us": {k: typing_us(d, 300) for k, d in DTYPES.items()}}
    with local_cluster(2) as (_, client):
        a, b = workers(client)
        with fabric_on(client, mb=3 * nbytes / 2**20 + 64) as fabric:

            def on(worker, fn, *args):
                return client.submit(fn, *args, workers=[worker], pure=False).result()

            inserts = {k: [] for k in DTYPES}
            gets = {k: [] for k in DTYPES}
            for i in range(reps + 1):  # the first round warms up; labels alternate within rounds
                for label, dtype in DTYPES.items():
                    name = f"bench/{label}/{i}"
                    seconds = on(a, insert_seconds, fabric, name, dtype, nbytes)
                    first = on(b, first_get_us, fabric, name)
                    fabric.delete(name)
                    if i:
                        inserts[label].append(nbytes / seconds / 1e9)
                        gets[label].append(first)
            result["insert_gbs"] = {k: statistics.median(v) for k, v in inserts.items()}
            result["first_get_us"] = {k: statistics.median(v) for k, v in gets.items()}
            result["small_per_s"] = {
                k: statistics.median(on(a, small_per_second, fabric, f"{k}{r}", d, small) for r in range(3))
                for k, d in DTYPES.items()
            }
    result["nbytes"] = nbytes
    return result


def table(result: dict) -> str:
    rows = [
        "| dtype | typing (µs) | insert (GB/s) | first get (µs) | 1 KiB inserts (/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    base = "float64 (baseline)"
    for label in DTYPES:
        cells = []
        for key, fmt in (
            ("typing_us", "{:.1f}"),
            ("insert_gbs", "{:.2f}"),
            ("first_get_us", "{:.0f}"),
            ("small_per_s", "{:.0f}"),
        ):
            value, ratio = result[key][label], result[key][label] / result[key][base]
            cells.append(fmt.format(value) + ("" if label == base else f" ({ratio:.2f}x)"))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="size of each inserted variable, MiB")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds after one warm-up")
    parser.add_argument("--small", type=int, default=1000, help="1 KiB inserts per sample")
    args = parser.parse_args()
    result = run(args.mb * 2**20, args.reps, args.small)
    print(f"dtypes: {args.mb} MiB variables, {args.reps} rounds after 1 warm-up; medians, ratio to float64")
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
