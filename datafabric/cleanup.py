"""Find and remove fabric segments that nothing owns any more.

When every process of a fabric crashed (scheduler, workers, clients), its blocks stay in
/dev/shm until the machine reboots.  A segment is stale when no process maps it and no
running fabric claims it (a running fabric may hold blocks of a dead worker, unmapped,
waiting for adoption).  Mappings are read from /proc/PID/maps, so only this machine's
processes count, which is right: a segment is only ever mapped on its own machine.
"""

from __future__ import annotations

from pathlib import Path

from datafabric.shm import PREFIX, SHM_DIR, Segment, fabric_segments


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


def stale_segments(live_fabric_ids: set[str] = frozenset()) -> list[str]:
    live_prefixes = {f"{PREFIX}{fid[:8]}_" for fid in live_fabric_ids}
    mapped = mapped_segments()
    return [
        name for name in fabric_segments() if name not in mapped and not any(name.startswith(p) for p in live_prefixes)
    ]


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
