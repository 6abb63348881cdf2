"""How the ``datafabric`` command shows things: rich tables for people, JSON for scripts,
and a progress bar for large transfers.

Kept apart from the commands so that every command prints the same sizes, the same
columns and the same JSON conventions.  Progress goes to stderr, so stdout stays the
table, the JSON or the data.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

PROGRESS_MIN_BYTES = 32 * 2**20  # smaller transfers finish before a bar is worth drawing
_PIPE_WIDTH = 240  # tables written to a pipe or file are not squeezed into 80 columns


def human_size(nbytes: float | None) -> str:
    """Binary units, as ``--mb`` counts them: 1 MB here is 2**20 bytes; None is unknown."""
    if nbytes is None:
        return "?"
    if abs(nbytes) < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes / 1024:.1f} TiB"


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); markup is off, so names holding brackets
    print as they are."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else _PIPE_WIDTH
    return Console(file=stream, highlight=False, markup=False, emoji=False, width=width)


def to_json(obj: Any) -> str:
    """JSON for scripts; numpy's bytes and complex values get a readable spelling."""
    return json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False)


def values(part: np.ndarray) -> Any:
    """``part.tolist()`` for JSON, with datetime64 and timedelta64 as numpy prints them
    (``tolist`` gives bare ints for units finer than microseconds; ``astype(str)``, unlike
    ``np.datetime_as_string``, reads big-endian ones right)."""
    if part.dtype.kind in "Mm":
        return part.astype(str).tolist()
    return part.tolist()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # a sub-array field of a record
        return values(value)
    if isinstance(value, datetime.date | datetime.timedelta):  # from records holding datetime64 fields
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, complex):
        return [value.real, value.imag]
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _table(title: str | None = None) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, show_edge=False)


def variables_table(rows: Iterable[dict]) -> Table:
    """``ls``: one row per variable; the nodes its copies are on."""
    table = _table()
    table.add_column("name")
    table.add_column("type")
    table.add_column("size", justify="right")
    table.add_column("locations")
    for row in rows:
        nodes = ", ".join(dict.fromkeys(loc[0] for loc in row["locations"]))
        table.add_row(row["name"], row["type"], human_size(row["nbytes"]), nodes)
    return table


def info_table(info: dict) -> Table:
    """``info``: every field of one variable, each location on a line of its own."""
    table = _table()
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("name", info["name"])
    table.add_row("type", info["type"])
    table.add_row("numpy", f"shape {tuple(info['shape'])}, dtype {info['dtype']}")
    table.add_row("size", f"{info['nbytes']} bytes ({human_size(info['nbytes'])})")
    table.add_row("doc", info["doc"])
    if "dataset" in info:  # a dataset: its chunk shape and how many chunks hold data
        ds = info["dataset"]
        table.add_row("chunks", f"{tuple(ds['chunks'])}, {ds['written']} written")
        if "fillvalue" in ds:
            table.add_row("fill value", json.dumps(ds["fillvalue"], default=_json_default, ensure_ascii=False))
            attrs = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in ds["attrs"].items())
            table.add_row("attrs", attrs or "none")
    locations = "\n".join(f"{node}  {shm_id}  offset {offset}" for node, shm_id, offset in info["locations"])
    table.add_row("locations", locations)
    return table


def status_table(rows: list[dict], title: str | None = None) -> Table:
    """``status`` and ``start``: one row per block, and a total per node."""
    table = _table(title)
    for name in ("node", "worker", "block"):
        table.add_column(name)
    for name in ("size", "used", "free", "largest free"):
        table.add_column(name, justify="right")
    table.add_column("variables")
    nodes: dict[str, list[dict]] = {}
    for row in rows:
        nodes.setdefault(row["node"], []).append(row)
    for node, blocks in nodes.items():
        for row in blocks:
            table.add_row(
                node,
                row["worker"] or "none: awaiting adoption",
                row["shm_id"],
                human_size(row["size"]),
                *_usage(row),
                _variables(row),
            )
        if len(blocks) > 1:
            ok = [b for b in blocks if "error" not in b]
            table.add_row(
                node,
                f"total of {len(blocks)} blocks",
                "",
                human_size(sum(b["size"] for b in blocks)),
                human_size(sum(b["used"] for b in ok)),
                human_size(sum(b["free"] for b in ok)),
                human_size(max((b["largest_free"] or 0 for b in ok), default=0)),
                str(sum(b["variables"] or 0 for b in ok)),
                style="bold",
                end_section=True,
            )
    return table


def memory_table(rows: list[dict]) -> Table:
    """``status``: what ``top`` shows per worker process, and what it is made of."""
    table = _table("memory per worker process: own (USS less the fabric's pages) and fabric pages mapped")
    for name in ("node", "worker", "pid"):
        table.add_column(name)
    for name in ("RES", "USS", "own", "fabric mapped", "fabric PSS"):
        table.add_column(name, justify="right")
    for row in rows:
        sizes = (row[k] for k in ("rss", "uss", "private", "fabric_mapped", "fabric_pss"))
        table.add_row(row["node"], row["worker"], str(row["pid"]), *(human_size(n) for n in sizes))
    return table


def _usage(row: dict) -> tuple[str, str, str]:
    if "error" in row:
        return ("?", "?", "?")
    return (human_size(row["used"]), human_size(row["free"]), human_size(row["largest_free"]))


def _variables(row: dict) -> str:
    if "error" in row:
        return f"cannot read the block's statistics: {row['error']}"
    return "?" if row["variables"] is None else str(row["variables"])


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)``; a bar is drawn on stderr when it is a terminal and the
    transfer is large, otherwise ``advance`` does nothing."""
    err = console(stderr=True)
    if not err.is_terminal or total < PROGRESS_MIN_BYTES:
        yield lambda nbytes: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda nbytes: bar.advance(task, nbytes)
