"""POSIX shared-memory segments whose lifetime the fabric, not Python, decides.

``multiprocessing.shared_memory`` hands every segment it opens to the resource tracker,
which unlinks it when the *opening* process's tracker exits: a reader worker that exits
would delete the owner's block.  The fabric unlinks its blocks itself (shutdown,
deallocate, and cleanup after crashes), so its segments are kept away from the tracker:
``track=False`` on Python 3.13+, and on 3.11/3.12 a filter on the tracker's register and
unregister that drops names of this fabric's prefix and passes every other name through.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from datafabric import hugepages
from datafabric.errors import OutOfSpaceError

PREFIX = "dfab_"
_NAME = re.compile(r"^/?dfab_[0-9a-f]{8}_[0-9a-f]{8}_[0-9a-f]{16}$")
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_PAGE = mmap.PAGESIZE
SHM_DIR = "/dev/shm"

if sys.version_info >= (3, 13):
    _UNTRACKED = {"track": False}
else:
    _UNTRACKED = {}
    _lock = threading.Lock()

    def _untracked(call):
        def filtered(name, rtype):
            if rtype == "shared_memory" and _NAME.match(name):
                return None
            return call(name, rtype)

        filtered.__wrapped__ = call
        return filtered

    with _lock:
        if not hasattr(resource_tracker.register, "__wrapped__"):
            resource_tracker.register = _untracked(resource_tracker.register)
            resource_tracker.unregister = _untracked(resource_tracker.unregister)


class _SharedMemory(SharedMemory):
    """Mapped at a huge-page-aligned address where that can help (``hugepages``), so a
    block made of huge pages is read through whole ones in every process.

    Closing a segment while a buffer taken from it is still alive (a ``create()``
    buffer kept past ``shutdown()``) unmaps nothing: the mapping lives until the last
    such buffer dies, and then goes with it.  Python's own class says so on stderr from
    its finalizer (``BufferError: cannot close exported pointers exist``); this one
    drops its file descriptor and its references instead, silently."""

    def __init__(self, name: str, create: bool = False, size: int = 0, **kwargs) -> None:
        super().__init__(name, create, size, **kwargs)
        try:
            aligned = hugepages.AlignedMapping.of(self._fd, self._size)
        except BaseException:
            self.close()
            if create:
                self.unlink()
            raise
        if aligned is not None:  # Python's mapping, untouched and unexported, is swapped for it
            self._buf.release()
            self._mmap.close()
            self._mmap, self._buf = aligned, aligned.buffer()

    def close(self) -> None:
        try:
            super().close()
        except BufferError:
            self._buf = None  # the exported views hold the mapping now
            self._mmap = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def node_tag(node: str) -> str:
    return hashlib.blake2b(node.encode(), digest_size=4).hexdigest()


def new_block_name(fabric_id: uuid.UUID, node: str) -> str:
    """A name that says whose block it is and that nobody can guess ahead of time."""
    return f"{PREFIX}{fabric_id.hex[:8]}_{node_tag(node)}_{secrets.token_hex(8)}"


def is_block_name(name: str) -> bool:
    return bool(_NAME.match(name))


def is_node_block_name(name: str, fabric_id: uuid.UUID, node: str) -> bool:
    """Whether ``name`` says it is a block of this fabric on this node."""
    return is_block_name(name) and name.lstrip("/").startswith(_node_prefix(fabric_id, node))


def _node_prefix(fabric_id: uuid.UUID, node: str) -> str:
    return f"{PREFIX}{fabric_id.hex[:8]}_{node_tag(node)}_"


def fabric_segments(fabric_id: uuid.UUID | None = None) -> list[str]:
    """Every segment of one fabric (or of all fabrics) on this machine, by name prefix
    (Linux lists them in /dev/shm): what shutdown and cleanup sweep up."""
    prefix = f"{PREFIX}{fabric_id.hex[:8]}_" if fabric_id else PREFIX
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(prefix) and is_block_name(n))


def node_segments(fabric_id: uuid.UUID, node: str) -> list[str]:
    """The segments of one fabric on one node: what a worker joining a fabric whose
    scheduler restarted finds and offers back to the YellowPages."""
    return [n for n in fabric_segments(fabric_id) if n.startswith(_node_prefix(fabric_id, node))]


def round_to_pages(nbytes: int) -> int:
    return max(_PAGE, -(-nbytes // _PAGE) * _PAGE)


class Segment:
    """One mapped segment.  ``buf`` is writable; views handed to users are read-only."""

    def __init__(self, shm: SharedMemory) -> None:
        self._shm = shm
        self.name = shm.name
        self.buf: memoryview = shm.buf
        self.size = shm.size
        self.address = int(np.frombuffer(self.buf, np.uint8, count=1).ctypes.data) if self.size else 0
        # What every view of this block holds (``views._Pin``): while one is alive, the
        # mapping is, even after ``close`` (one buffer per block, not one per view).
        self.readonly: memoryview | None = self.buf.toreadonly()

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create (O_EXCL, mode 0600), in huge pages where the kernel gives them
        (``hugepages``), and pre-fault, so no insert ever takes a page fault and a full
        tmpfs is an error here rather than a SIGBUS later."""
        if not is_block_name(name):
            raise ValueError(f"not a fabric block name: {name!r}")
        shm = None
        try:
            with _tmpfs_lock():  # the check and the pages it allows, one process at a time
                budget = shm_budget()
                if size > budget.available:
                    raise OutOfSpaceError(
                        f"cannot reserve {size} bytes ({_mib(size)}) of shared memory for block {name}: "
                        f"{budget.explain()}. Allocate fewer megabytes, or free memory on this machine."
                    )
                shm = _SharedMemory(name, create=True, size=size, **_UNTRACKED)  # unlinks itself if it fails
                hugepages.collapse(shm._fd, shm._mmap, size)
                os.posix_fallocate(shm._fd, 0, size)  # reserve tmpfs pages now: ENOSPC, not SIGBUS
            _populate(shm)
        except FileExistsError:
            raise
        except OSError as exc:
            if shm is not None:
                shm.close()
                shm.unlink()
            raise OutOfSpaceError(
                f"cannot reserve {size} bytes of shared memory for block {name}: {exc.strerror}. "
                "Free space in /dev/shm (df -h /dev/shm) or allocate fewer megabytes."
            ) from None
        return cls(shm)

    @classmethod
    def attach(cls, name: str) -> Segment:
        if not is_block_name(name):
            raise ValueError(f"not a fabric block name: {name!r}")
        return cls(_SharedMemory(name, create=False, **_UNTRACKED))

    def private(self) -> bool:
        """Ours alone, as ``create`` makes every block: owned by this user, mode 0600.
        A segment found by name (after a crash) is trusted only then: another user
        could plant one with a fabric's name prefix."""
        st = os.fstat(self._shm._fd)
        return st.st_uid == os.geteuid() and not st.st_mode & 0o077

    def close(self) -> None:
        """Unmap, unless user views still pin the mapping; then it unmaps when they die."""
        self.readonly = None  # dropped, not released: the views holding it keep the pages
        self._shm.close()

    def unlink(self) -> None:
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


def _populate(shm: SharedMemory) -> None:
    try:
        shm._mmap.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # kernel older than 5.14: touch one byte per page instead
        np.frombuffer(shm.buf, np.uint8)[::_PAGE] = 0


MARGIN_MIN = 64 * 2**20  # bytes of RAM never promised to shared memory, at the least
MARGIN_FRACTION = 32  # and a 32nd of the RAM (or of the cgroup limit) that bounds it


@dataclass(frozen=True)
class ShmBudget:
    """What this machine can still give to new shared memory, and which limit says so.

    Tmpfs pages are RAM: a tmpfs sized above the free RAM (the default is half of it,
    and containers often mount more) lets ``posix_fallocate`` take pages the machine
    does not have, and the kernel's OOM killer then kills processes, unrelated ones
    included.  So a block must fit under all three limits: the RAM the kernel reports
    available, the memory cgroup this process is charged to, and the tmpfs itself.
    The first two are estimates the rest of the machine keeps moving, so a margin of
    them is never promised; the tmpfs's free space is exact and gets none."""

    mem_available: int  # MemAvailable of /proc/meminfo, less the margin
    cgroup_free: int | None  # the tightest memory cgroup limit over this process, less the margin
    tmpfs_free: int  # free bytes of the tmpfs, by statvfs

    @property
    def available(self) -> int:
        limits = [self.mem_available, self.tmpfs_free]
        if self.cgroup_free is not None:
            limits.append(self.cgroup_free)
        return max(0, min(limits))

    def explain(self) -> str:
        parts = [f"free RAM {_mib(self.mem_available)}", f"free space of {SHM_DIR} {_mib(self.tmpfs_free)}"]
        if self.cgroup_free is not None:
            parts.append(f"room under the memory cgroup limit {_mib(self.cgroup_free)}")
        given = f"{self.available} bytes ({_mib(self.available)})"
        return f"this machine can give {given} more to shared memory ({', '.join(parts)}, after a safety margin)"


def shm_budget() -> ShmBudget:
    """How many bytes this machine can still give to new shared memory, with the
    figures behind it: what ``Segment.create`` checks before it takes any page, and
    what a planner can sum a node's blocks against before it asks several workers."""
    meminfo = _meminfo()
    total = meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    cgroup = _cgroup_headroom()
    try:
        st = os.statvfs(SHM_DIR)
        tmpfs_free = st.f_bavail * st.f_frsize
    except OSError:
        tmpfs_free = 0
    return ShmBudget(
        mem_available=available - _margin(total),
        cgroup_free=None if cgroup is None else cgroup[0] - _margin(cgroup[1]),
        tmpfs_free=tmpfs_free,
    )


def _margin(total: int) -> int:
    return max(MARGIN_MIN, total // MARGIN_FRACTION)


def _meminfo() -> dict[str, int]:
    figures = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            number, *unit = value.split()
            figures[key] = int(number) * (1024 if unit == ["kB"] else 1)
    return figures


def _cgroup_headroom() -> tuple[int, int] | None:
    """(limit - usage, limit) of the tightest memory cgroup this process is charged
    to, its ancestors included (v2: memory.max, v1: memory.limit_in_bytes); None where
    no limit applies."""
    try:
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return None
    tightest = None
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            found = _cgroup_mount(mounts, "cgroup2", None)
            files = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            found = _cgroup_mount(mounts, "cgroup", "memory")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        if found is None:
            continue
        root, mountpoint = found
        relative = os.path.relpath(path, root)
        if relative.startswith(".."):
            continue  # our cgroup is outside what is mounted here
        directory = Path(mountpoint, relative).resolve()
        while True:
            headroom = _limit_headroom(directory, *files)
            if headroom is not None and (tightest is None or headroom[0] < tightest[0]):
                tightest = headroom
            if directory == Path(mountpoint) or directory.parent == directory:
                break
            directory = directory.parent
    return tightest


def _cgroup_mount(mounts: list[list[str]], fstype: str, controller: str | None) -> tuple[str, str] | None:
    """(root, mount point) of the cgroup hierarchy, from /proc/self/mountinfo fields."""
    for fields in mounts:
        if "-" not in fields:
            continue
        tail = fields[fields.index("-") + 1 :]
        if tail[0] == fstype and (controller is None or controller in tail[-1].split(",")):
            return fields[3], fields[4]
    return None


def _limit_headroom(directory: Path, limit_file: str, usage_file: str) -> tuple[int, int] | None:
    try:
        limit_text = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or int(limit_text) >= 2**62:  # v1 spells "no limit" as a huge number
        return None
    return int(limit_text) - usage, int(limit_text)


@contextlib.contextmanager
def _tmpfs_lock() -> Iterator[None]:
    """An advisory lock on the tmpfs directory itself, shared by every process of this
    machine and freed by the kernel if its holder dies: without it, two workers
    creating blocks at once would both be told the same free memory is theirs."""
    fd = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
