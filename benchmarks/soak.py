"""``python -m benchmarks.soak --minutes 20``: the churn of ``tests/test_churn.py`` for a
long time, while worker processes are SIGKILLed and their nannies start them again.

A LocalCluster of worker processes with nannies runs one churn task per worker thread, in
rounds of ``--round`` seconds; the client churns too, and defragments in a loop.  Every 20 to 40 s a killer
SIGKILLs a random worker process; a peer adopts its blocks, its nanny starts it again,
and Dask retries the task that ran there (a retry writes fresh names).  Each actor keeps a
journal file of the inserts that returned and the deletes it set out to make, so that what
a killed actor confirmed is still checked at the end.

At the end: every listed variable is read and verified, the journals are compared with
the listing (a returned insert neither deleted nor listed is a lost insert), the blocks'
accounts must balance, and deleting everything must free every block.  Prints ops, kills,
bytes checked, bad reads and lost inserts; exits non-zero if any read was bad or any
insert was lost.  Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
from distributed import Client, LocalCluster

import datafabric
from tests import churn

cloudpickle.register_pickle_by_value(churn)


class Killer:
    """SIGKILLs a random worker process every ``low`` to ``high`` seconds."""

    def __init__(self, client: Client, low: float, high: float, rng: random.Random) -> None:
        self.client, self.low, self.high, self.rng = client, low, high, rng
        self.kills: list[str] = []
        self.due = time.monotonic() + rng.uniform(low, high)

    def maybe_kill(self) -> None:
        if time.monotonic() < self.due:
            return
        self.due = time.monotonic() + self.rng.uniform(self.low, self.high)
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:
            return
        victim = self.rng.choice(workers)
        try:
            pid = self.client.run(os.getpid, workers=[victim])[victim]
        except Exception as exc:  # it died or left meanwhile: try again at the next turn
            print(f"  kill of {victim} skipped: {exc!r}", flush=True)
            return
        os.kill(pid, signal.SIGKILL)
        self.kills.append(victim)
        print(f"  {time.strftime('%H:%M:%S')} SIGKILL {victim} (pid {pid})", flush=True)


def client_rounds(fabric, seconds: float, round_s: float, seed: int, journals: str, out: list) -> None:
    """The client's own churn, in rounds, in a thread beside the driver."""
    deadline = time.monotonic() + seconds
    k = 0
    while time.monotonic() < deadline:
        path = os.path.join(journals, f"client-{k}.log")
        out.append(churn.churn(fabric, f"c{k}", seed + k, min(round_s, deadline - time.monotonic()), path))
        k += 1


def _extents_left(shm_id: str, dask_worker=None) -> list[tuple]:
    """The non-free extents of a block, as its owner's headers say: what a leak is made of."""
    from datafabric import layout

    block = dask_worker.plugins["datafabric"].blocks[shm_id]
    return [
        (e.offset, e.state.name, e.size, e.name, e.extent_id)
        for e in layout.walk(block.segment.buf, block.allocator.size)
        if e.state is not layout.ExtentState.FREE
    ]


def final_checks(client: Client, fabric, journals: list[str]) -> dict:
    """Everything settled: verify the listing, the journals and the accounts."""
    inserted, deleted = churn.read_journals(journals)
    listed = set(fabric.get_list(churn.PREFIX))
    wrong = churn.verify_listed(fabric)
    for worker in sorted(client.scheduler_info()["workers"]):
        wrong += client.submit(churn.verify_listed, fabric, workers=[worker], pure=False).result()
    status = fabric.status()
    unbalanced = [b["shm_id"] for b in status if b["used"] + b["free"] != b["capacity"]]
    for name in fabric.get_list():
        fabric.delete(name)
    deadline = time.monotonic() + 30
    while not all(b["free"] == b["capacity"] for b in fabric.status()) and time.monotonic() < deadline:
        time.sleep(0.2)
    still_used = [(b["shm_id"], b["capacity"] - b["free"]) for b in fabric.status() if b["free"] != b["capacity"]]
    for b in fabric.status():
        if b["free"] != b["capacity"] and b["worker"]:
            print(f"  left in {b['shm_id']}: {client.run(_extents_left, b['shm_id'], workers=[b['worker']])}")
    return {
        "lost": sorted(inserted - deleted - listed),
        "wrong": sorted(set(wrong)),
        "unbalanced": unbalanced,
        "still_used": still_used,
        "listed": len(listed),
        "journalled": len(inserted),
    }


def drive(client: Client, fabric, args: argparse.Namespace, journals: str) -> tuple[list[dict], Counter, list[str]]:
    """Churn tasks in rounds, one per worker thread, the client's churn beside them, and
    the killer, for ``args.minutes``; returns the tallies, the task runs lost to kills
    (by error), and the workers killed."""
    seconds = args.minutes * 60
    killer = Killer(client, args.kill_min, args.kill_max, random.Random(args.seed))
    by_client: list[dict] = []
    mine = threading.Thread(
        target=client_rounds, args=(fabric, seconds, args.round, args.seed, journals, by_client), daemon=True
    )
    compacting = ThreadPoolExecutor(1)
    defragmenter = compacting.submit(churn.defragment_loop, fabric, seconds, 0.05)
    started = time.monotonic()
    mine.start()
    tallies: list[dict] = []
    interrupted: Counter = Counter()
    submitted = 0

    def submit() -> object:
        nonlocal submitted
        submitted += 1
        path = os.path.join(journals, f"task-{submitted}.log")
        seed = args.seed * 1000 + submitted
        return client.submit(churn.churn, fabric, f"t{submitted}", seed, args.round, path, pure=False)

    running = {submit() for _ in range(args.workers * args.threads)}
    while running:
        time.sleep(0.5)
        done = {f for f in running if f.done()}
        running -= done
        for future in done:
            try:
                tallies.append(future.result())
            except Exception as exc:  # killed on every retry: its reads cannot be counted
                interrupted[type(exc).__name__] += 1
            if time.monotonic() - started < seconds:
                running.add(submit())
        if time.monotonic() - started < seconds:
            killer.maybe_kill()
    mine.join()
    tallies.append(defragmenter.result())
    compacting.shutdown()
    return tallies + by_client, interrupted, killer.kills


def report(tot: dict, checks: dict, interrupted: Counter, kills: list[str]) -> int:
    """Print the findings; 1 if any read was bad or any returned insert was lost."""
    print(churn.summary(tot))
    print(f"  kills: {len(kills)}; task runs lost to a kill: {dict(interrupted)} (not counted as reads)")
    print(f"  at the end: {checks['listed']} listed, {checks['journalled']} inserts journalled")
    print(f"  wrong after settling: {len(checks['wrong'])} {checks['wrong'][:10]}")
    print(f"  confirmed inserts lost (journals vs listing): {len(checks['lost'])} {checks['lost'][:10]}")
    print(f"  unbalanced blocks: {checks['unbalanced']}; used after deleting all: {checks['still_used']}")
    failed = tot["bad_reads"] or tot["lost"] or checks["wrong"] or checks["lost"]
    failed = failed or checks["unbalanced"] or checks["still_used"]
    print("SOAK FAILED" if failed else "soak passed", flush=True)
    return 1 if failed else 0


def soak(args: argparse.Namespace) -> int:
    journals = tempfile.mkdtemp(prefix="datafabric-soak-")
    cluster = LocalCluster(
        n_workers=args.workers, threads_per_worker=args.threads, dashboard_address=None, host="127.0.0.1"
    )
    client = Client(cluster)
    fabric = datafabric.start(client, mb=args.mb)
    print(f"soak: {args.workers} workers x {args.threads} threads, {args.mb} MiB, {args.minutes} min", flush=True)
    try:
        tallies, interrupted, kills = drive(client, fabric, args, journals)
        client.wait_for_workers(args.workers, timeout=120)
        time.sleep(2)  # the last restarted worker registers and adopts
        checks = final_checks(client, fabric, [os.path.join(journals, f) for f in os.listdir(journals)])
    finally:
        fabric.shutdown()
        client.close()
        cluster.close()
        shutil.rmtree(journals, ignore_errors=True)
    return report(churn.total(tallies), checks, interrupted, kills)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=4, help="worker processes, each with a nanny")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker; one churn task each")
    parser.add_argument("--mb", type=float, default=256, help="fabric memory, spread over the workers")
    parser.add_argument("--round", type=float, default=10.0, help="seconds one churn task runs")
    parser.add_argument("--kill-min", type=float, default=20.0)
    parser.add_argument("--kill-max", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=1)
    sys.exit(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
