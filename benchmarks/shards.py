"""A simulation behind ``docs/scaling.md``: what splitting the directory over several
schedulers would buy, and what each choice of shard key costs.

Two parts.  (1) Measured: one ``yp.directory.Directory`` (the YellowPages' state, no Dask)
seals a million names in batches of 10,000; its seal rate and traced memory per name say
how far one scheduler goes.  (2) Simulated: the same names spread over K shards by three
keys (a hash of the whole name, a hash of its first path component, ranges of the sorted
names) give the load of the busiest shard against the mean, and how many shards a
``get_list(prefix)`` of one group and a ``delete_prefix`` of a run must ask.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import time
import tracemalloc
import zlib
from collections import Counter

from yp.directory import Directory
from yp.records import Block

RUNS = 50  # names look like run<r>/step<s>/var<v>: a few runs, of very different sizes


def workload(n: int, seed: int = 0) -> list[str]:
    """Names of a skewed workload: run sizes follow a Zipf-like law, as real projects do
    (one large campaign, many small experiments)."""
    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(RUNS)]
    runs = rng.choices(range(RUNS), weights, k=n)
    counts: Counter = Counter()
    names = []
    for r in runs:
        i = counts[r]
        counts[r] += 1
        names.append(f"run{r:02d}/step{i // 1000:05d}/var{i % 1000:03d}")
    return names


def measure_one(names: list[str]) -> dict:
    d = Directory()
    d.add_block(Block("A", "n", "w", 1 << 50, 1 << 50))
    items = [
        {"name": n, "doc": "", "type": "8 * uint8", "nbytes": 8, "shm_id": "A", "extent_offset": i * 192,
         "extent_size": 192, "data_offset": i * 192 + 128, "extent_id": i + 1}
        for i, n in enumerate(names)
    ]  # fmt: skip
    tracemalloc.start()
    t0 = time.perf_counter()
    for k in range(0, len(items), 10_000):
        d.seal_all(items[k : k + 10_000])
    seconds = time.perf_counter() - t0
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    t0 = time.perf_counter()
    for _ in range(100):
        d.names("run07/step00003/", 1000)
    page = (time.perf_counter() - t0) / 100
    return {"seals_per_s": len(names) / seconds, "bytes_per_name": memory / len(names), "page_s": page}


def shard_of(key: str, name: str, k: int, splits: list[str]) -> int:
    if key == "hash(name)":
        return zlib.crc32(name.encode()) % k
    if key == "hash(first component)":
        return zlib.crc32(name.split("/", 1)[0].encode()) % k
    return bisect.bisect_right(splits, name)  # ranges of the sorted names


def simulate(names: list[str], k: int) -> list[dict]:
    ordered = sorted(names)
    splits = [ordered[len(ordered) * i // k] for i in range(1, k)]
    rows = []
    groups = sorted({n.rsplit("/", 1)[0] for n in names})
    sample = set(random.Random(1).sample(groups, min(200, len(groups))))
    for key in ("hash(name)", "hash(first component)", "ranges of sorted names"):
        load: Counter = Counter()
        by_group: dict[str, set] = {g: set() for g in sample}
        runs: dict[str, set] = {}
        for n in names:
            shard = shard_of(key, n, k, splits)
            load[shard] += 1
            group, run = n.rsplit("/", 1)[0], n.split("/", 1)[0]
            if group in by_group:
                by_group[group].add(shard)
            runs.setdefault(run, set()).add(shard)
        rows.append(
            {
                "key": key,
                "busiest_vs_mean": max(load.values()) / (len(names) / k),
                "shards_per_group_listing": sum(len(s) for s in by_group.values()) / len(by_group),
                "shards_per_run_delete": sum(len(s) for s in runs.values()) / len(runs),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--names", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    names = workload(args.names)
    one = measure_one(names)
    print(
        f"one directory, {args.names:,} names: {one['seals_per_s']:,.0f} seals/s, "
        f"{one['bytes_per_name']:.0f} bytes per name (traced), a page of 1,000 by prefix in {one['page_s'] * 1e3:.2f} ms"
    )
    print(
        f"| shard key ({args.shards} shards) | busiest shard / mean | shards a group listing asks | shards a run's delete asks |"
    )
    print("|---|---:|---:|---:|")
    rows = simulate(names, args.shards)
    for r in rows:
        print(
            f"| {r['key']} | {r['busiest_vs_mean']:.2f} | {r['shards_per_group_listing']:.2f} | {r['shards_per_run_delete']:.2f} |"
        )
    print(json.dumps({"one": one, "shards": rows}))


if __name__ == "__main__":
    main()
