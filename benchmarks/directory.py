"""The directory at scale: a million names, through the public API.

Two tasks (one per worker of a 2-worker LocalCluster) insert 1,000,000 variables of 8
bytes with ``insert_many`` in batches of 10,000, named ``scale/<group>/<i>`` (1,000 groups
of 1,000).  Then, with every name in, medians of: ``get_list(prefix)`` of one group,
a page of 1,000 names after a random name, ``status()``, and ``delete_many`` of 100,000
names (once, with the CPU it costs the scheduler and the blocks' owners: robust to load).  Same-run baselines: a bare scheduler round trip (what any call costs at least),
the scan of every name that ``get_list(prefix)`` was before the index (timed inside the
scheduler), and ``delete`` one name at a time.  The insert rate of the last tenth of the
names is compared with the first tenth's, and the scheduler's memory per variable is its
RSS growth over the names.  Python's full garbage collections are metered in every
process of the insert (each worker, which owns its block and holds a grant per name of
its node, and the scheduler, which in a LocalCluster is the client's process): their CPU
per name inserted, in the first tenth and the last.  Once the names are in, a full
collection is timed in each process, with the objects it tracks and the references it
follows: a container of plain values per name costs nothing, one the collector tracks
makes every full collection of a long insert follow all its entries.  A profile of the
scheduler during the last tenth of the inserts (``--profile``) shows where an insert's
time goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import threading
import time

import numpy as np
from distributed import Client, LocalCluster

import datafabric
from benchmarks.timing import summary
from datafabric import layout
from datafabric.protocol import SCHEDULER_PLUGIN

GROUP = 1000  # names per group: get_list(prefix) of one group lists this many
BATCH = 10_000
PAGE = 1000
DELETE_MANY = 100_000
VALUE = np.arange(8, dtype=np.uint8)


def name(group: int, i: int) -> str:
    return f"scale/{group:04d}/{i:03d}"


def fill(fabric: datafabric.Fabric, groups: list[int]) -> list[tuple[float, float, int, float, float]]:
    """Runs in a task: the groups' names in batches; returns (start, end, names, CPU
    seconds of the task's thread, of which in Python's full garbage collections) per batch.
    A full collection walks every object the worker process's collector tracks, so its
    cost grows with whatever the worker keeps per name."""
    names = [name(g, i) for g in groups for i in range(GROUP)]
    me, full, began = threading.get_ident(), [0.0], {}

    def collected(phase: str, info: dict) -> None:
        if info["generation"] != 2 or threading.get_ident() != me:
            return
        if phase == "start":
            began["cpu"] = time.thread_time()
        elif "cpu" in began:
            full[0] += time.thread_time() - began.pop("cpu")

    batches = []
    gc.callbacks.append(collected)
    try:
        for start in range(0, len(names), BATCH):
            t0, cpu0, gc0 = time.time(), time.thread_time(), full[0]
            fabric.insert_many([(n, "", np.uint8, VALUE) for n in names[start : start + BATCH]])
            n = len(names[start : start + BATCH])
            batches.append((t0, time.time(), n, time.thread_time() - cpu0, full[0] - gc0))
    finally:
        gc.callbacks.remove(collected)
    return batches


def full_collection(dask_scheduler=None) -> tuple[int, int, float]:
    """In a process once the names are in: the objects its garbage collector tracks, the
    references a full collection follows from them (every entry of every tracked
    container, however plain its values), and the median time of a full collection (what
    every full collection during a long insert costs there)."""
    gc.collect()
    tracked = gc.get_objects()
    references = sum(len(gc.get_referents(o)) for o in tracked)
    times = []
    for _ in range(3 if dask_scheduler is not None else 5):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return len(tracked), references, statistics.median(times)


def meter_collections(dask_scheduler=None, dask_worker=None) -> None:
    """Logs each full collection of this process, on any thread: when it ended and the
    CPU time of the thread it ran on."""
    log, began = [], {}

    def collected(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            began[threading.get_ident()] = time.thread_time()
        elif (t0 := began.pop(threading.get_ident(), None)) is not None:
            log.append((time.time(), time.thread_time() - t0))

    gc.callbacks.append(collected)
    server = dask_scheduler if dask_scheduler is not None else dask_worker
    server._df_collections = (collected, log)


def metered_collections(dask_scheduler=None, dask_worker=None) -> list[tuple[float, float]]:
    server = dask_scheduler if dask_scheduler is not None else dask_worker
    collected, log = server._df_collections
    gc.callbacks.remove(collected)
    return log


def collections_per_name(log: list[tuple[float, float]], batches: list) -> float:
    """The CPU seconds of the full collections that ended while ``batches`` ran, per name
    they inserted."""
    start, end = min(b[0] for b in batches), max(b[1] for b in batches)
    return sum(cpu for t, cpu in log if start <= t <= end) / sum(b[2] for b in batches)


def meter_seals(dask_scheduler) -> None:
    """The scheduler's CPU time for each seal request, with the directory's size then: CPU
    time, unlike wall time, does not count the other processes of a loaded machine.  (A
    seal of inserts placed in the writer's own block handles the request with no await.)"""
    handler = dask_scheduler.handlers["datafabric_seal"]
    log = dask_scheduler._datafabric_seal_cpu = []
    directory = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory

    async def metered(**kwargs):
        t0 = time.thread_time()
        answer = await handler(**kwargs)
        log.append((len(directory.variables), len(kwargs["items"]), time.thread_time() - t0))
        return answer

    dask_scheduler.handlers["datafabric_seal"] = metered


def seal_cpu(dask_scheduler) -> list[tuple[int, int, float]]:
    return dask_scheduler._datafabric_seal_cpu


def meter_cpu(handlers: dict, op: str, log: list) -> None:
    """CPU time of the process's thread (its event loop's) across each ``op`` request,
    awaits included: what a delete costs the scheduler, or a free its owner, however
    loaded the machine is."""
    handler = handlers[op]

    async def metered(*args, **kwargs):
        t0 = time.thread_time()
        answer = handler(*args, **kwargs)
        if hasattr(answer, "__await__"):
            answer = await answer
        log.append(time.thread_time() - t0)
        return answer

    handlers[op] = metered


def meter_deletes(dask_scheduler) -> None:
    meter_cpu(dask_scheduler.handlers, "datafabric_delete_many", dask_scheduler.__dict__.setdefault("_df_cpu", []))


def meter_frees(dask_worker) -> None:
    meter_cpu(dask_worker.handlers, "datafabric_free", dask_worker.__dict__.setdefault("_df_cpu", []))


def metered_cpu(dask_scheduler=None, dask_worker=None) -> float:
    """The CPU seconds metered so far, and the meter reset."""
    server = dask_scheduler if dask_scheduler is not None else dask_worker
    spent, server._df_cpu[:] = sum(server._df_cpu), []
    return spent


def scheduler_rss(dask_scheduler) -> int:
    import psutil

    return psutil.Process().memory_info().rss


def scan(prefix: str, dask_scheduler=None) -> float:
    """The listing as it was before the index: every name tested, then sorted."""
    names = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory.variables
    t0 = time.perf_counter()
    sorted(n for n in names if n.startswith(prefix))
    return time.perf_counter() - t0


def profile_start(dask_scheduler) -> None:
    import cProfile

    dask_scheduler._datafabric_profile = cProfile.Profile()
    dask_scheduler._datafabric_profile.enable()


def profile_stop(dask_scheduler) -> str:
    import io
    import pstats

    profile = dask_scheduler._datafabric_profile
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def timed(fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def run(names: int, reps: int, profile: bool) -> dict:
    groups = names // GROUP
    extent = layout.extent_size_for(1 << 20, name(groups, 0), "8 * uint8", "", 8)
    mb = 8 * names * extent / 2**20 + 64  # each worker's own block holds its task's half
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        fabric = datafabric.start(client, mb=mb)
        try:
            rss0 = client.run_on_scheduler(scheduler_rss)
            client.run_on_scheduler(meter_seals)
            empty = list(client.run(full_collection).values())  # the writers' own objects, before any name
            client.run_on_scheduler(meter_collections)
            client.run(meter_collections)
            workers = sorted(client.scheduler_info()["workers"])
            mine = {w: [g for g in range(groups) if g % len(workers) == k] for k, w in enumerate(workers)}
            futures = [client.submit(fill, fabric, mine[w], workers=[w], pure=False) for w in workers]
            report = None
            if profile:  # the last tenth: started once nine tenths are in
                while len(fabric.get_list("", limit=names)) < 0.9 * names:
                    time.sleep(1)
                client.run_on_scheduler(profile_start)
            batches = sorted(b for f in client.gather(futures) for b in f)
            logs = {"scheduler": client.run_on_scheduler(metered_collections)}
            logs |= {f"worker {k}": log for k, log in enumerate(client.run(metered_collections).values())}
            collections = list(client.run(full_collection).values())
            scheduler_collection = client.run_on_scheduler(full_collection)
            if profile:
                report = client.run_on_scheduler(profile_stop)
            rss1 = client.run_on_scheduler(scheduler_rss)
            assert len(fabric.get_list()) == names

            tenth = max(1, len(batches) // 10)
            rates = [n / (end - start) for start, end, n, _, _ in batches]
            first, last = statistics.median(rates[:tenth]), statistics.median(rates[-tenth:])
            task_cpu = [cpu / n for _, _, n, cpu, _ in batches]  # seconds per name, the writer's thread
            task_gc = [full / n for _, _, n, _, full in batches]  # of which full garbage collections
            seals = sorted(client.run_on_scheduler(seal_cpu))
            sealed = [cpu / n for _, n, cpu in seals]  # seconds per name, the scheduler
            tenth_s = max(1, len(sealed) // 10)
            process_gc = {
                who: (collections_per_name(log, batches[:tenth]), collections_per_name(log, batches[-tenth:]))
                for who, log in logs.items()
            }

            rng = random.Random(1)
            round_trip = timed(lambda: client.sync(client.scheduler.identity), reps)
            prefixes = [f"scale/{rng.randrange(groups):04d}/" for _ in range(reps)]
            prefix = timed(lambda: fabric.get_list(prefixes.pop()), reps)
            prefixes = [f"scale/{rng.randrange(groups):04d}/" for _ in range(5)]
            scans = [client.run_on_scheduler(scan, p) for p in prefixes]
            afters = [name(rng.randrange(groups), rng.randrange(GROUP)) for _ in range(reps)]
            page = timed(lambda: fabric.get_list("", limit=PAGE, after=afters.pop()), reps)
            status = timed(fabric.status, reps)

            doomed = [name(g, i) for g in range(DELETE_MANY // GROUP) for i in range(GROUP)]
            client.run_on_scheduler(meter_deletes)
            client.run(meter_frees)
            t0 = time.perf_counter()
            assert fabric.delete_many(doomed) == len(doomed)
            bulk = time.perf_counter() - t0
            delete_cpu = client.run_on_scheduler(metered_cpu)
            free_cpu = sum(client.run(metered_cpu).values())
            singles = [name(g, i) for g in range(DELETE_MANY // GROUP, DELETE_MANY // GROUP + 1) for i in range(GROUP)]
            t0 = time.perf_counter()
            for n in singles:
                fabric.delete(n)
            one_by_one = time.perf_counter() - t0
        finally:
            fabric.shutdown()
    return {
        "names": names,
        "insert_rate_first_tenth": first,
        "insert_rate_last_tenth": last,
        "insert_ratio_last_to_first": last / first,
        "task_cpu_per_name_first_tenth": statistics.median(task_cpu[:tenth]),
        "task_cpu_per_name_last_tenth": statistics.median(task_cpu[-tenth:]),
        "task_gc_per_name_first_tenth": statistics.mean(task_gc[:tenth]),
        "task_gc_per_name_last_tenth": statistics.mean(task_gc[-tenth:]),
        "writer_tracked_objects": statistics.median(n for n, _, _ in collections),
        "writer_references_followed": statistics.median(r for _, r, _ in collections),
        "writer_full_collection": statistics.median(t for _, _, t in collections),
        "writer_full_collection_before_names": statistics.median(t for _, _, t in empty),
        "writer_references_followed_before_names": statistics.median(r for _, r, _ in empty),
        "scheduler_tracked_objects": scheduler_collection[0],
        "scheduler_references_followed": scheduler_collection[1],
        "scheduler_full_collection": scheduler_collection[2],
        "full_collections_cpu_per_name_first_last_tenth": process_gc,
        "seal_cpu_per_name_first_tenth": statistics.median(sealed[:tenth_s]),
        "seal_cpu_per_name_last_tenth": statistics.median(sealed[-tenth_s:]),
        "scheduler_bytes_per_variable": (rss1 - rss0) / names,
        "round_trip": summary(round_trip),
        "get_list_prefix": summary(prefix),
        "scan_prefix_in_scheduler": summary(scans),
        "page_after": summary(page),
        "status": summary(status),
        "status_blocks": 2,
        "delete_many_rate": len(doomed) / bulk,
        "delete_many_scheduler_cpu_per_name": delete_cpu / len(doomed),
        "delete_many_owners_cpu_per_name": free_cpu / len(doomed),
        "delete_one_by_one_rate": len(singles) / one_by_one,
        "profile": report,
    }


def table(r: dict) -> str:
    rt = r["round_trip"]["median"]

    def ms(key: str) -> str:
        s = r[key]
        return f"{s['median'] * 1e3:.2f} ms | {s['min'] * 1e3:.2f} | {s['max'] * 1e3:.2f} | {s['median'] / rt:.1f}x"

    rows = [
        "| measurement | median | min | max | vs a bare round trip |",
        "|---|---:|---:|---:|---:|",
        f"| bare scheduler round trip | {ms('round_trip')} |",
        f"| get_list(prefix) of {GROUP:,} names | {ms('get_list_prefix')} |",
        f"| the scan it replaced, inside the scheduler | {ms('scan_prefix_in_scheduler')} |",
        f"| get_list('', limit={PAGE}, after=a random name) | {ms('page_after')} |",
        f"| status(), {r['status_blocks']} blocks | {ms('status')} |",
        "",
        "| rate | value |",
        "|---|---:|",
        f"| insert_many, first tenth (names/s, median of batches) | {r['insert_rate_first_tenth']:,.0f} |",
        f"| insert_many, last tenth | {r['insert_rate_last_tenth']:,.0f} ({r['insert_ratio_last_to_first']:.2f}x) |",
        f"| writer's CPU per name, first tenth / last tenth (µs) | {r['task_cpu_per_name_first_tenth'] * 1e6:.1f} / "
        f"{r['task_cpu_per_name_last_tenth'] * 1e6:.1f} "
        f"({r['task_cpu_per_name_first_tenth'] / r['task_cpu_per_name_last_tenth']:.2f}x the rate) |",
        f"| of which full garbage collections, first tenth / last tenth (µs, mean) | "
        f"{r['task_gc_per_name_first_tenth'] * 1e6:.1f} / {r['task_gc_per_name_last_tenth'] * 1e6:.1f} |",
        *(
            f"| {who}'s full garbage collections, CPU per name inserted, first tenth / last tenth (µs) | "
            f"{first * 1e6:.1f} / {last * 1e6:.1f} |"
            for who, (first, last) in r["full_collections_cpu_per_name_first_last_tenth"].items()
        ),
        f"| a full garbage collection in a writer's process, all names in (ms; objects, references it follows) | "
        f"{r['writer_full_collection'] * 1e3:.1f} ({r['writer_tracked_objects']:,.0f}, "
        f"{r['writer_references_followed']:,.0f}: {r['writer_references_followed'] / r['names']:.2f} per name; "
        f"before any name {r['writer_full_collection_before_names'] * 1e3:.1f} ms, "
        f"{r['writer_references_followed_before_names']:,.0f}) |",
        f"| a full garbage collection in the scheduler, all names in (ms; objects, references it follows) | "
        f"{r['scheduler_full_collection'] * 1e3:.1f} ({r['scheduler_tracked_objects']:,.0f}, "
        f"{r['scheduler_references_followed']:,.0f}: {r['scheduler_references_followed'] / r['names']:.2f} per name) |",
        f"| scheduler's CPU per sealed name, first tenth / last tenth (µs) | "
        f"{r['seal_cpu_per_name_first_tenth'] * 1e6:.1f} / {r['seal_cpu_per_name_last_tenth'] * 1e6:.1f} "
        f"({r['seal_cpu_per_name_first_tenth'] / r['seal_cpu_per_name_last_tenth']:.2f}x the rate) |",
        f"| delete_many of {DELETE_MANY:,} names (names/s) | {r['delete_many_rate']:,.0f} |",
        f"| delete_many: the scheduler's CPU / the owners' free's CPU, per name (µs) | "
        f"{r['delete_many_scheduler_cpu_per_name'] * 1e6:.1f} / {r['delete_many_owners_cpu_per_name'] * 1e6:.1f} |",
        f"| delete, one name a call (names/s) | {r['delete_one_by_one_rate']:,.0f} "
        f"({r['delete_many_rate'] / r['delete_one_by_one_rate']:.0f}x slower than delete_many) |",
        f"| scheduler memory per variable | {r['scheduler_bytes_per_variable']:,.0f} bytes |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--names", type=int, default=1_000_000, help="a multiple of 200,000 (default 1,000,000)")
    parser.add_argument("--reps", type=int, default=50, help="samples per latency median")
    parser.add_argument("--profile", action="store_true", help="cProfile the scheduler over the last tenth")
    args = parser.parse_args()
    result = run(args.names, args.reps, args.profile)
    print(f"directory at scale: {result['names']:,} names of 8 bytes on a 2-worker LocalCluster")
    print(table(result))
    if result["profile"]:
        print(result["profile"])
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}))


if __name__ == "__main__":
    main()
