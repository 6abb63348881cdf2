"""Turn a run into what people read: Markdown tables with the environment above them,
every figure next to its baseline and, for peers, the fabric's figure as a ratio; the raw
JSON that keeps every sample (warm-up rounds included) so later runs can be compared
with it; and a plot (``plot.py``).  Only the latest set is kept in the results folder:
numbers from different runs or machines are not comparable anyway."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.cluster import size_label
from benchmarks.timing import summary

HIGHER_IS_BETTER = {"GB/s", "ops/s"}
SYSTEMS = {"fabric": "fabric", "limit": "limit", "dask": "Dask", "ray": "Ray", "vineyard": "Vineyard"}  # as shown

GROUPS = {
    "put": "Put: one float64 array into the system",
    "get": "Get in another worker process on the same node",
    "small": "Small objects: 1 KiB puts, one call each",
    "memory": "Memory: N worker processes holding a view of one variable (MiB per holder)",
    "lifecycle": "Defragment throughput, and create+seal vs insert",
}

NOTES = """\
- One warm-up round ran before the timed ones and is left out of the table (it is the first
  sample of each list in `latest.json`). GB = 10^9 bytes. median, min and max are over the timed
  rounds (memory: over the N holders). The fabric and Dask ran first; then Ray, then Vineyard, each
  with its daemons up only during its own phase.
- **vs baseline** and **fabric vs this** are speed ratios of medians: bandwidth or ops/s divided by
  the other's, or the other's time (or memory) divided by this one's. Above 1 means this row
  (vs baseline) or the fabric (fabric vs this) is faster or smaller. "limit" is `np.copyto` into
  pre-faulted shared memory in the same process (put), a numpy view of a segment the reader
  attached itself (get), `ctypes.memmove` within one pre-faulted segment (defragment).
- Put: the array exists beforehand and is deleted (untimed) after each round. Fabric rows and the
  limit alternate in the same process. Dask, Ray and Vineyard put from the client (their driver).
  Ray's store is pre-faulted (`preallocate_plasma_memory`), as the fabric's blocks are.
- Get: a fresh object each round (fabric: a fresh name inserted from a task on A), read in worker
  B (Ray: in an actor; Vineyard: in worker B of a cluster of its own). cold = its first get in B
  + touching one element, timed alone; warm = get + touch again with a view alive (median of many
  calls); sum = get + `sum()`, after one untimed sum faulted the pages in. The fabric's very first
  get in B also maps A's block: its own row. Dask: a fresh `scatter` to A, then the client's wall
  time of a task on B that touches (or sums) it, scheduling and the result's way back included
  (compared with the fabric's cold get, and its sum); its transfer alone is from B's transfer log.
- Small objects: one call per object in a loop (fabric `insert` from a task on A), and the
  batched paths: fabric `insert_many` (one seal RPC per batch; target: 10,000/s) and Dask's
  `scatter` of a list.
- Memory: USS and PSS (psutil `memory_full_info()`) of each holder, after minus before it got the
  object and summed it. Fabric: one owner worker holds the block (not counted), N other workers
  hold views. Ray: N actors hold `ray.get` views; the store is the raylet's, and the driver that
  put the object maps it too. Dask: each of N workers holds its own copy (`scatter(broadcast=True)`).
  PSS splits a shared page among all its mappers, owner or store included.
- Defragment: insert 8 MiB variables from a task on A, delete every other one, then the client's
  wall time of `fabric.defragment()`; bytes are its `bytes_moved`. The limit moves the same bytes
  in the same pattern with `ctypes.memmove` within one pre-faulted segment, in a task on A."""


def row(
    group: str,
    key: str,
    measurement: str,
    system: str,
    unit: str,
    samples: list[float],
    *,
    category: str,
    panel: str | None = None,
    series: str | None = None,
    warmup: int = 1,
    base: tuple[str, str] | None = None,
    fabric: str | None = None,
    detail: dict | None = None,
) -> dict:
    """One line of a table.  ``samples`` include ``warmup`` leading rounds left out of the
    summary; ``base`` is ``(key, label)`` of the row it is judged against, ``fabric`` the
    key of the fabric's row a peer's row is compared with; ``panel``/``series`` place its
    bar in the plot, at ``category`` (a size, or a number of holders); ``detail`` is kept
    in the JSON only."""
    timed = samples[warmup:]
    return {
        "group": group,
        "key": key,
        "measurement": measurement,
        "system": system,
        "unit": unit,
        "category": category,
        **summary(timed),
        "base": base,
        "fabric": fabric,
        "panel": panel,
        "series": series,
        "warmup": warmup,
        "samples": samples,
        **({"detail": detail} if detail else {}),
    }


def speed_ratio(this: dict, other: dict) -> float | None:
    """How much faster (or smaller) ``this`` is than ``other``."""
    a, b = this["median"], other["median"]
    if this["unit"] in HIGHER_IS_BETTER:
        a, b = b, a
    return b / a if a > 0 and b > 0 else None


def finish(rows: list[dict]) -> list[dict]:
    """Resolve the ratios and order each group by category, then as measured."""
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        base = by_key.get(r["base"][0]) if r["base"] else None
        r["vs_base"] = speed_ratio(r, base) if base else None
        fab = by_key.get(r["fabric"]) if r["fabric"] else None
        r["fabric_vs"] = speed_ratio(fab, r) if fab else None
    order = {}
    for r in rows:
        order.setdefault((r["group"], r["category"]), len(order))
    groups = list(GROUPS)
    return sorted(rows, key=lambda r: (groups.index(r["group"]), order[r["group"], r["category"]]))


def environment(peers: dict) -> dict:
    versions = {}
    for dist in ["numpy", "dask", "distributed", "datafabric", "psutil", "ray", "vineyard", "matplotlib"]:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions,
        "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "load_average_at_end": os.getloadavg(),  # other work on the machine shows here
        "peers": peers,
    }


def targets(rows: list[dict], params: dict) -> list[tuple[str, str, bool]]:
    """The fabric's targets (project issue 6): ``(target, measured, met)`` for each."""
    by_key = {r["key"]: r for r in rows}
    sizes = [size_label(n) for n in params["sizes"]]
    largest, held = sizes[-1], size_label(params["memory_bytes"])
    checks = [
        (f"insert {largest}, task on A, ≥ 0.9 × np.copyto", by_key[f"put/{largest}/insert-task"]["vs_base"], "×", ">=", 0.9),
        ("warm get in another process ≤ 50 µs (slowest size)", max(by_key[f"get/{s}/fabric-warm"]["median"] for s in sizes), " µs", "<=", 50),
        ("cold get ≤ 1 ms (slowest size)", max(by_key[f"get/{s}/fabric-cold"]["median"] for s in sizes) / 1e3, " ms", "<=", 1),
        ("1 KiB inserts ≥ 10,000/s on a batched path (insert_many)", by_key["small/fabric-batched"]["median"], " ops/s", ">=", 10_000),
        (f"USS per holder of {held} ≤ 20 MiB (worst holder)", max(r["max"] for r in rows if r["key"].endswith("fabric-USS")), " MiB", "<=", 20),
    ]  # fmt: skip
    return [
        (what, f"{x:.3f}{unit}" if unit == "×" else f"{_num(x)}{unit}", x >= bound if op == ">=" else x <= bound)
        for what, x, unit, op, bound in checks
    ]


def markdown(env: dict, params: dict, rows: list[dict], wall_seconds: float) -> str:
    versions = " · ".join(f"{k} {v}" for k, v in env["versions"].items())
    ran = ", ".join(f"{name}: {status}" for name, status in env["peers"].items())
    lines = [
        "## datafabric side-by-side benchmark" + (" (--quick)" if params["quick"] else ""),
        "",
        f"{env['date']} · Python {env['python']} · {versions} · {env['cpus']} CPUs · {env['platform']}",
        "",
        f"Ran: datafabric, Dask (always); {ran}. LocalCluster of 2 worker processes (A, B) × 1 thread on "
        f"loopback. Warm gets: {params['calls']:,} calls per round (Ray, Vineyard: {params['peer_calls']:,}). "
        f"The run took {wall_seconds:.0f} s.",
    ]
    for group, title in GROUPS.items():
        group_rows = [r for r in rows if r["group"] == group]
        if not group_rows:
            continue
        lines += [
            "",
            f"### {title}",
            "",
            "| measurement | system | median | min | max | unit | n | vs baseline | fabric vs this |",
            "|---|---|---:|---:|---:|---|---:|---|---:|",
        ]
        for r in group_rows:
            vs = f"{r['vs_base']:.2f}× {r['base'][1]}" if r["vs_base"] is not None else ""
            fab = f"{r['fabric_vs']:.2f}×" if r["fabric_vs"] is not None else ""
            nums = (_num(r[k]) for k in ("median", "min", "max"))
            lines.append(
                f"| {r['measurement']} | {r['system']} | {' | '.join(nums)} | {r['unit']} | {r['n']} | {vs} | {fab} |"
            )
    lines += ["", "### The fabric's targets", "", "| target | measured | met |", "|---|---:|---|"]
    lines += [
        f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in targets(rows, params)
    ]
    return "\n".join([*lines, "", "Notes:", "", NOTES, ""])


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def save(out_dir: Path, document: dict, text: str, figure) -> list[Path]:
    """``latest.md``, ``latest.json`` and ``latest.png`` (if matplotlib could draw it),
    each written to a ``.tmp`` file first and renamed, so a reader never sees half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, write) -> None:
        path = out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)
        written.append(path)

    put("latest.md", lambda p: p.write_text(text))
    put("latest.json", lambda p: p.write_text(json.dumps(document, indent=1) + "\n"))
    if figure is not None:
        put("latest.png", lambda p: figure.savefig(p, format="png", dpi=110))
    return written
