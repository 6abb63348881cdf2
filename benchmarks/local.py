"""Reads that stay on the node: the first get in a task, ``get_many``, the client's cold get,
and what fresh gets cost the scheduler; the fabric with local leases against the fabric
with them switched off (``datafabric.local-reads: false``, every get asks the YellowPages,
as before) in the same run, and Ray and Vineyard where installed.

    python -m benchmarks.local [--rounds N] [--seconds S] [--peers ray,vineyard|none]

Medians of ``--rounds`` samples; every sample of a first get is a fresh name put by
worker A just before (untimed) and got once by a task on worker B of the same node.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from typing import Any

import dask
import numpy as np
from distributed import Client

import datafabric
from benchmarks import peers
from benchmarks.cluster import local_cluster, workers
from datafabric import layout
from datafabric.layout import BlockHeader
from datafabric.shm import Segment, new_block_name
from datafabric.views import LocalState
from worker_plugin.local_reads import LocalReads

KiB = 2**10
SMALL = 8 * KiB  # the object of a first get: small, so the get's own cost shows
MANY = 1000  # names of 1 KiB for get_many


def _put(fabric: datafabric.Fabric, name: str, nbytes: int) -> None:
    fabric.insert(name, "benchmark", np.uint8, np.ones(nbytes, np.uint8))


def _first_get_ns(fabric: datafabric.Fabric, name: str) -> int:
    """In a task on B: the first get of ``name`` in this process, and a touch."""
    t0 = time.perf_counter_ns()
    fabric.get(name)[0]
    return time.perf_counter_ns() - t0


def _first_numpy_ns() -> int:
    """In a task on B, the floor under any first get: the first trivial numpy call of a
    task, the interpreter and caches as cold as the get finds them."""
    t0 = time.perf_counter_ns()
    np.zeros(3)[0]
    return time.perf_counter_ns() - t0


def _get_many_s(fabric: datafabric.Fabric, names: list[str]) -> float:
    t0 = time.perf_counter()
    views = fabric.get_many(names)
    elapsed = time.perf_counter() - t0
    assert len(views) == len(names)
    return elapsed


def _fresh_gets(fabric: datafabric.Fabric, names: list[str], seconds: float) -> int:
    """In a task: get names one after the other, each view dropped before the next, so
    that every get is a first get in this process; returns how many it did."""
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in names:
            fabric.get(name)[0]
            done += 1
    return done


def _loop_cpu_seconds(dask_scheduler: Any = None) -> float:
    """The scheduler's event-loop thread's CPU time (the client shares its process)."""
    return time.thread_time()


def fabric_rows(local: bool, rounds: int, seconds: float) -> dict:
    with dask.config.set({"datafabric.local-reads": local}), local_cluster(2) as (_, client):
        a, b = workers(client)
        fabric = datafabric.start(client, mb=256)
        try:
            return _measure(client, fabric, a, b, rounds, seconds)
        finally:
            fabric.shutdown()


def _measure(client: Client, fabric: datafabric.Fabric, a: str, b: str, rounds: int, seconds: float) -> dict:
    out: dict[str, Any] = {}
    first = []
    for i in range(rounds + 1):  # the first round also maps A's block in B: left out
        name = f"bench/first/{i}"
        client.submit(_put, fabric, name, SMALL, workers=[a], pure=False).result()
        first.append(client.submit(_first_get_ns, fabric, name, workers=[b], pure=False).result() / 1e3)
    out["task first get (µs)"] = first[1:]
    floor = [client.submit(_first_numpy_ns, workers=[b], pure=False).result() / 1e3 for _ in range(rounds + 1)]
    out["task first np.zeros(3), the floor (µs)"] = floor[1:]

    names = [f"bench/many/{i}" for i in range(MANY)]
    client.submit(
        lambda f: f.insert_many([(n, "", np.uint8, np.ones(KiB, np.uint8)) for n in names]), fabric, workers=[a]
    ).result()
    time.sleep(0.5)  # the publication reaches B
    many = [client.submit(_get_many_s, fabric, names, workers=[b], pure=False).result() for _ in range(rounds)]
    out["task get_many of 1000 x 1 KiB (names/s)"] = [MANY / s for s in many]
    client_many = [_get_many_s(fabric, names) for _ in range(rounds)]
    out["client get_many of 1000 x 1 KiB (names/s)"] = [MANY / s for s in client_many]

    cold, rpc = [], []
    for i in range(rounds + 1):
        name = f"bench/client/{i}"
        client.submit(_put, fabric, name, SMALL, workers=[a], pure=False).result()
        t0 = time.perf_counter_ns()
        fabric.info(name)
        rpc.append((time.perf_counter_ns() - t0) / 1e3)
        t0 = time.perf_counter_ns()
        fabric.get(name)[0]
        cold.append((time.perf_counter_ns() - t0) / 1e3)
    out["client first get (µs)"] = cold[1:]
    out["client info of that name: one bare scheduler RPC (µs)"] = rpc[1:]

    pool = names[:200]
    before = client.run_on_scheduler(_loop_cpu_seconds)
    tasks = [
        client.submit(_fresh_gets, fabric, pool, seconds, workers=[w], pure=False) for w in (a, a, b, b)
    ]  # 4 tasks: 2 threads on each worker
    gets = sum(client.gather(tasks))
    cpu = client.run_on_scheduler(_loop_cpu_seconds) - before
    out["scheduler CPU s, 4 tasks of fresh gets"] = [cpu]
    out["fresh gets done by the 4 tasks"] = [gets]
    out["scheduler CPU µs per fresh get"] = [cpu / gets * 1e6]
    return out


def in_process_rows(rounds: int) -> dict:
    """The local lease's own cost, with no cluster and no task around it: 1,000 names of a
    block published to a ``LocalReads`` and leased one after the other, against numpy
    views of the same bytes (the same-run baseline that shows how loaded the machine is)."""
    fabric_id = uuid.uuid4()
    segment = Segment.create(new_block_name(fabric_id, "bench"), 4 * 2**20)
    try:
        layout.write_block_header(segment.buf, BlockHeader(uuid.uuid4(), fabric_id, "bench", segment.size))
        reads = LocalReads(LocalState(fabric_id.hex), "bench", "bench-worker", lambda msg: None, lambda report: None)
        shm_id = segment.name.lstrip("/")
        reads.publish(
            [{"var_id": i, "name": f"n/{i}", "type": "1024 * uint8", "shm_id": shm_id, "data_offset": 4096 + KiB * i,
              "extent_id": i} for i in range(MANY)]
        )  # fmt: skip
        names = [f"n/{i}" for i in range(MANY)]
        leased, batched, raw = [], [], []
        for _ in range(rounds):  # each list of views dies before the next is timed: its leases end untimed
            t0 = time.perf_counter()
            views = [reads.pin(name).view() for name in names]
            leased.append((time.perf_counter() - t0) / MANY * 1e6)
            del views
            t0 = time.perf_counter()
            views = [pin.view() for pin in reads.pin_many(names)]  # type: ignore[union-attr]
            batched.append((time.perf_counter() - t0) / MANY * 1e6)
            del views
            t0 = time.perf_counter()
            views = [np.frombuffer(segment.buf, np.uint8, count=KiB, offset=4096 + KiB * i) for i in range(MANY)]
            raw.append((time.perf_counter() - t0) / MANY * 1e6)
            del views
        return {
            "in process: local lease + view, per name (µs)": leased,
            "in process: batch of 1000 local leases + views, per name (µs)": batched,
            "in process: np.frombuffer, per name (µs)": raw,
        }
    finally:
        segment.unlink()
        segment.close()


def ray_rows(rounds: int, strays: list[str]) -> dict:
    with peers.ray_session(strays) as ray:
        writer = ray.remote(num_cpus=0)(_RayWriter).remote()
        reader = ray.remote(num_cpus=0)(_RayReader).remote()
        task, driver = [], []
        for _ in range(rounds + 1):
            [ref] = ray.get(writer.put.remote(SMALL))
            task.append(ray.get(reader.first_get_ns.remote([ref])) / 1e3)
            [ref] = ray.get(writer.put.remote(SMALL))
            t0 = time.perf_counter_ns()
            ray.get(ref)[0]
            driver.append((time.perf_counter_ns() - t0) / 1e3)
        return {"task first get (µs)": task[1:], "client first get (µs)": driver[1:]}


class _RayWriter:
    """Worker A of Ray: the owner of what it puts."""

    def put(self, nbytes: int) -> list:
        import ray

        return [ray.put(np.ones(nbytes, np.uint8))]


class _RayReader:
    def first_get_ns(self, refs: list) -> int:
        import ray

        t0 = time.perf_counter_ns()
        ray.get(refs[0])[0]
        return time.perf_counter_ns() - t0


def vineyard_rows(rounds: int, strays: list[str]) -> dict:
    with local_cluster(2) as (_, client), peers.vineyard_session(strays) as (vclient, socket):
        _, b = workers(client)
        try:
            task = []
            for _ in range(rounds + 1):
                oid = vclient.put(np.ones(SMALL, np.uint8))
                r = client.submit(peers.vineyard_read, socket, int(oid), 1, 1, workers=[b], pure=False).result()
                task.append(r["cold"] / 1e3)
                vclient.delete(oid)
            return {"task first get (µs)": task[1:]}
        finally:
            client.run(peers.vineyard_disconnect)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--peers", default=None, help="comma-separated, of ray,vineyard; or none")
    args = parser.parse_args(argv)
    requested = None if args.peers is None else [p for p in args.peers.split(",") if p and p != "none"]
    results = {
        "fabric, local leases": fabric_rows(True, args.rounds, args.seconds) | in_process_rows(args.rounds),
        "fabric, every get asks the YellowPages (before)": fabric_rows(False, args.rounds, args.seconds),
    }
    strays: list[str] = []
    for name, status in peers.choose(requested).items():
        if status != "to run":
            print(f"{name}: {status}")
            continue
        try:
            results[name] = (ray_rows if name == "ray" else vineyard_rows)(args.rounds, strays)
        except Exception as exc:
            print(f"{name} failed: {type(exc).__name__}: {exc}")
    print(report(results))
    return 1 if strays else 0


def report(results: dict[str, dict]) -> str:
    """One table: each measurement's median per system, and its ratio to the fabric's."""
    base = results["fabric, local leases"]
    lines = ["| measurement | system | median | vs fabric with local leases |", "|---|---|---|---|"]
    for measurement in base:
        for system, rows in results.items():
            if measurement not in rows:
                continue
            median = statistics.median(rows[measurement])
            ratio = median / statistics.median(base[measurement])
            lines.append(f"| {measurement} | {system} | {median:,.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
