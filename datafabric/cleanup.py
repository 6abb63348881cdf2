"""Find and remove fabric segments that are proven dead, and nothing else.

When every process of a fabric crashed, its blocks stay in /dev/shm until the machine
reboots.  A running fabric, though, may hold unmapped blocks too: those of a dead worker
waiting for a new one, and a block a worker is creating right now.  So a segment is
removed only when each of these is shown, and kept (with the reason) otherwise:

1. it is this user's, mode 0600, as the fabric makes every block;
2. it is older than ``MIN_AGE`` seconds (by ctime and mtime): a younger one may be being
   created; /dev/shm is listed *before* the mappings are read, so a block created in
   between is seen as young, never as unmapped;
3. its header reads as a datafabric block, and the name's fabric prefix matches it;
4. its fabric id is no running fabric the caller reached (``live``);
5. it is not durable (a uuid5 id: a scheduler restarted with the preload takes it
   back), unless the caller says to forget durable fabrics;
6. no process of this machine maps it (/proc/PID/maps, read again just before unlink).

``remove`` is the fabric's own sweep of its own blocks at shutdown; ``survey`` and
``remove_dead`` are for crashed fabrics.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from datafabric import layout
from datafabric.shm import PREFIX, SHM_DIR, Segment, fabric_segments

MIN_AGE = 10.0  # seconds: a segment younger than this may be a block being created


@dataclass(frozen=True)
class Verdict:
    name: str
    fabric_id: str | None  # from its header, when it reads
    kept_because: str | None  # None: proven dead


def mapped_segments() -> set[str]:
    """Names of fabric segments some process on this machine has mapped."""
    mapped: set[str] = set()
    marker = f"{SHM_DIR}/{PREFIX}"
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            at = line.find(marker)
            if at >= 0:
                mapped.add(line[at + len(SHM_DIR) + 1 :].split()[0])
    return mapped


def survey(live: set[str], names: list[str] | None = None, *, forget_durable: bool = False) -> list[Verdict]:
    """A verdict on every fabric segment of this machine (or on ``names``)."""
    listed = fabric_segments()  # first: see the module's docstring
    mapped = mapped_segments()
    wanted = listed if names is None else [n for n in names if n in set(listed)]
    now = time.time()
    return [_judge(name, live, mapped, now, forget_durable) for name in wanted]


def _judge(name: str, live: set[str], mapped: set[str], now: float, forget_durable: bool) -> Verdict:
    try:
        segment = Segment.attach(name)
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        return Verdict(name, None, f"cannot open it ({exc.__class__.__name__})")
    try:
        st = os.stat(f"{SHM_DIR}/{name}")
        if not segment.private():
            return Verdict(name, None, "not this user's, or not mode 0600: not made by this user's fabric")
        age = now - max(st.st_ctime, st.st_mtime)
        if age < MIN_AGE:
            return Verdict(name, None, f"{age:.0f} s old, younger than {MIN_AGE:g} s: it may be being created")
        try:
            header = layout.read_block_header(segment.buf)
        except layout.LayoutError as exc:
            return Verdict(name, None, f"its header does not read ({exc})")
    finally:
        segment.close()
    fabric_id = header.fabric_id.hex
    if not name.startswith(f"{PREFIX}{fabric_id[:8]}_"):
        return Verdict(name, fabric_id, "its name and its header name different fabrics")
    if fabric_id in live:
        return Verdict(name, fabric_id, "its fabric is running")
    if header.fabric_id.version == 5 and not forget_durable:
        return Verdict(name, fabric_id, "its fabric is durable: a scheduler restarted with the preload takes it back")
    if name in mapped:
        return Verdict(name, fabric_id, "a process maps it")
    return Verdict(name, fabric_id, None)


def remove_dead(verdicts: list[Verdict]) -> list[str]:
    """Unlink the segments found dead, unless a process mapped one meanwhile."""
    dead = [v.name for v in verdicts if v.kept_because is None]
    mapped = mapped_segments()
    return remove([n for n in dead if n not in mapped])


def remove(names: list[str]) -> list[str]:
    """Unlink the segments the fabric made (this user's, mode 0600); returns those
    actually removed."""
    removed = []
    for name in names:
        try:
            segment = Segment.attach(name)
        except (FileNotFoundError, PermissionError):
            continue
        mine = segment.private()
        segment.close()
        if mine:
            segment.unlink()
            removed.append(name)
    return removed
