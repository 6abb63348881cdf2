"""Turn a run's raw results into what people read: a Markdown table with the environment
above it, each figure next to its baseline, and a JSON document that keeps every sample
(warm-up rounds included, first in each list) so later runs can be compared with it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import dask
import distributed
import numpy as np

from benchmarks.timing import summary

NOTES = """\
- Every timed loop ran one warm-up round first, left out of the table except as the client's first
  insert (its process had not yet touched the block's pages). Bandwidth is bytes divided by the
  seconds of that call alone (GB = 10^9 bytes). "vs" is the median over rounds of this row's
  value divided by its baseline's in the same round (they alternate, so both see the same machine).
- Insert rows time `fabric.insert` only: the array exists beforehand, and the variable is deleted
  after each round. The baseline is `np.copyto` of the same array into a pre-faulted segment (one
  page larger) in the same process, alternating with the inserts: at the segment's start
  (page-aligned), and at the same offset within a page as the insert's data.
- Warm get: each call (`fabric.get(name)[0]`, or `np.frombuffer(seg.buf, ...)[0]` for the
  baseline) timed with `perf_counter_ns`; a repetition's value is the median of its calls.
- Cold get of fresh names: one sample per name, in a process that has the block mapped already.
- Dask rows: a fresh `client.scatter` to A each round (untimed), then the client's wall time of
  `client.submit(lambda x: x[0], future, workers=[B]).result()`, nothing subtracted (it includes
  scheduling and the result's way back); and the duration of the transfer in B's transfer log."""


def environment() -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "datafabric": importlib.metadata.version("datafabric"),
        "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def rows(raw: dict, nbytes: int) -> list[dict]:
    """The table's rows; ``[1:]`` leaves out each loop's warm-up round."""
    size = f"{nbytes / 2**30:g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:g} MiB"
    ins_w, ins_c, get, dask_ = raw["insert_worker"], raw["insert_client"], raw["get"], raw["dask"]

    def gbps(seconds):
        return [nbytes / s / 1e9 for s in seconds[1:]]

    def us(ns):
        return [t / 1e3 for t in ns[1:]]

    def ms(seconds):
        return [s * 1e3 for s in seconds[1:]]

    copy_w = _row("↳ baseline: np.copyto into pre-faulted shm, worker A", "GB/s", gbps(ins_w["copyto"]))
    copy_c = _row("↳ baseline: np.copyto into pre-faulted shm, client", "GB/s", gbps(ins_c["copyto"]))
    raw_view = _row("↳ baseline: np.frombuffer view of attached shm, worker B", "µs", us(get["raw"]["median_ns"]))
    at_offset = "↳ np.copyto at byte {} of a page"
    return [
        _row(f"insert {size}, in a task on worker A", "GB/s", gbps(ins_w["insert"]), (copy_w, "copyto")),
        copy_w,
        _row(at_offset.format(ins_w["page_offset"]), "GB/s", gbps(ins_w["copyto_at_offset"]), (copy_w, "copyto")),
        _row(f"insert {size}, from the client", "GB/s", gbps(ins_c["insert"]), (copy_c, "copyto")),
        copy_c,
        _row(at_offset.format(ins_c["page_offset"]), "GB/s", gbps(ins_c["copyto_at_offset"]), (copy_c, "copyto")),
        _row(f"insert {size}, from the client, its first call", "GB/s", [nbytes / ins_c["insert"][0] / 1e9]),
        _row("get, warm (a view alive), worker B, per call", "µs", us(get["get"]["median_ns"]), (raw_view, "raw view")),
        raw_view,
        _row(f"get, cold: the {size} array's first get in B (maps the block)", "µs", [get["cold_ns"] / 1e3]),
        _row("get, cold: first get of fresh names in B", "µs", us(raw["cold_get_ns"])),
        _row(f"Dask: scatter {size} to A, task on B uses it (client wall time)", "ms", ms(dask_["wall"])),
        _row("Dask: of which B's transfer (B's transfer log)", "ms", ms(dask_["transfer"])),
    ]


def _row(measurement: str, unit: str, samples: list[float], vs: tuple[dict, str] | None = None) -> dict:
    """``vs``: the baseline row measured in alternation with this one, and its short name."""
    row = {"measurement": measurement, "unit": unit, **summary(samples), "vs": "", "samples": samples}
    if vs is not None:
        base, label = vs
        ratios = [x / y for x, y in zip(samples, base["samples"], strict=True)]
        row["vs"] = f"{statistics.median(ratios):.2f}× {label}"
    return row


def markdown(env: dict, params: dict, table: list[dict]) -> str:
    lines = [
        "## datafabric core benchmark",
        "",
        f"{env['date']} · Python {env['python']} · numpy {env['numpy']} · dask {env['dask']} · "
        f"distributed {env['distributed']} · datafabric {env['datafabric']} · {env['cpus']} CPUs · {env['platform']}",
        "",
        f"LocalCluster of 2 worker processes × 1 thread; {params['nbytes'] / 2**20:g} MiB float64 array; "
        f"{params['repeat']} repetitions after 1 warm-up; {params['calls']:,} calls per warm-get repetition; "
        f"{params['fresh_names']} fresh names; run took {params['run_seconds']:.0f} s.",
        "",
        "| measurement | median | min | max | unit | n | vs |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for r in table:
        cells = [r["measurement"], *(_num(r[k]) for k in ("median", "min", "max")), r["unit"], str(r["n"]), r["vs"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", NOTES, ""])


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def save(out_dir: Path, document: dict, text: str) -> Path:
    """``core-YYYYMMDD-HHMMSS.json`` (local time) with everything, and ``latest.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"core-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    (out_dir / "latest.md").write_text(f"{text}\nRaw results: `{path.name}`\n")
    return path
