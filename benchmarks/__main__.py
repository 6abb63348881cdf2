"""``python -m benchmarks [--quick] [--peers ray,vineyard] [--out DIR]``: the side-by-side
suite in one run.  The fabric, the physical limits and Dask always run; Ray and Vineyard run
when installed and asked for, each in a phase of its own with its daemons up only for that
phase, so that no peer's daemons run beside another system's measurements.  Prints the
Markdown tables and writes ``latest.md``, ``latest.json`` and ``latest.png``."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import traceback
from pathlib import Path

from benchmarks import get, lifecycle, memory, peers, plot, put, report, small
from benchmarks.cluster import MiB, Plan, fabric_on, local_cluster, sweep_dev_shm, workers


def fabric_and_dask(plan: Plan) -> list[dict]:
    """Two workers A and B, each with a block that holds two arrays of the largest size."""
    block_mb = 2 * plan.sizes[-1] / MiB + 64
    with local_cluster(2) as (_, client):
        a, b = workers(client)
        with fabric_on(client, mb=2 * block_mb) as fabric:
            rows = put.fabric_and_dask(client, fabric, a, plan)
            rows += get.fabric_and_dask(client, fabric, a, b, plan)
            rows += lifecycle.defragment_rows(client, fabric, a, plan)
            rows += small.fabric_and_dask(client, fabric, a, plan)
    return rows + memory.fabric_rows(plan) + memory.dask_rows(plan)


def with_ray(plan: Plan, strays: list[str]) -> list[dict]:
    with peers.ray_session(strays) as ray:
        return [
            *put.peer_rows("ray", ray.put, lambda ref: None, plan),  # the dropped ref frees the object
            *get.ray_rows(ray, plan),
            *small.peer_rows("ray", ray.put, lambda refs: None, plan),
            *memory.ray_rows(ray, plan),
        ]


def with_vineyard(plan: Plan, strays: list[str]) -> list[dict]:
    """Its reader is worker B of a cluster of its own (started first: not the session's)."""
    with local_cluster(2) as (_, client), peers.vineyard_session(strays) as (vclient, socket):
        _, b = workers(client)
        try:
            return [
                *put.peer_rows("vineyard", vclient.put, vclient.delete, plan),
                *get.vineyard_rows(client, b, vclient, socket, plan),
                *small.peer_rows("vineyard", vclient.put, vclient.delete, plan),
            ]
        finally:
            client.run(peers.vineyard_disconnect)


PHASES = {"ray": with_ray, "vineyard": with_vineyard}


def _without_paths(text: str) -> str:
    """Error messages go into the results, which are committed: keep file names only."""
    return re.sub(r"(?:/[\w.+-]+)+/([\w.+-]+)", r"…/\1", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 256 MiB, fewer rounds and objects")
    parser.add_argument(
        "--peers",
        help=f"comma-separated peers to run, of {','.join(peers.PEERS)}, or 'none' (default: every installed one)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="default: benchmarks/results"
    )
    args = parser.parse_args(argv)
    requested = None if args.peers is None else [p for p in args.peers.split(",") if p and p != "none"]
    unknown = set(requested or []) - set(peers.PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    plan = Plan.make(args.quick)
    status = {name: _without_paths(s) for name, s in peers.choose(requested).items()}
    print("Peers: " + "; ".join(f"{n}: {s}" for n, s in status.items()), flush=True)

    rows, strays = [], []
    t0 = time.perf_counter()
    try:
        rows += fabric_and_dask(plan)
        for name, phase in PHASES.items():
            if status[name] != "to run":
                continue
            try:
                rows += phase(plan, strays)
                status[name] = "ran"
            except Exception as exc:
                traceback.print_exc()
                status[name] = _without_paths(f"failed: {type(exc).__name__}: {exc}")
    finally:
        left = sweep_dev_shm(plan)
    wall = time.perf_counter() - t0

    rows = report.finish(rows)
    env = report.environment(status)
    params = {k: v for k, v in dataclasses.asdict(plan).items() if k != "run_id"}
    params["reps"] = {str(n): plan.reps(n) for n in plan.sizes}
    text = report.markdown(env, params, rows, wall)
    print(text)
    document = {
        "environment": env,
        "parameters": params,
        "wall_seconds": wall,
        "left_in_dev_shm": left,
        "stray_processes": strays,
        "rows": rows,
    }
    written = report.save(args.out, document, text, plot.figure(rows))
    print("Written: " + ", ".join(p.name for p in written) + f" (in {args.out})")
    if left or strays:
        print(f"LEFT BEHIND (now removed): /dev/shm {left}; processes {strays}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
