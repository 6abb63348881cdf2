"""POSIX shared-memory segments whose lifetime the fabric, not Python, decides.

``multiprocessing.shared_memory`` hands every segment it opens to the resource tracker,
which unlinks it when the *opening* process's tracker exits: a reader worker that exits
would delete the owner's block.  The fabric unlinks its blocks itself (shutdown,
deallocate, and cleanup after crashes), so its segments are kept away from the tracker:
``track=False`` on Python 3.13+, and on 3.11/3.12 a filter on the tracker's register and
unregister that drops names of this fabric's prefix and passes every other name through.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import secrets
import sys
import threading
import uuid
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

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
    """Closing a segment while a buffer taken from it is still alive (a ``create()``
    buffer kept past ``shutdown()``) unmaps nothing: the mapping lives until the last
    such buffer dies, and then goes with it.  Python's own class says so on stderr from
    its finalizer (``BufferError: cannot close exported pointers exist``); this one
    drops its file descriptor and its references instead, silently."""

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

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create (O_EXCL, mode 0600) and pre-fault, so no insert ever takes a page fault
        and a full tmpfs is an error here rather than a SIGBUS later."""
        if not is_block_name(name):
            raise ValueError(f"not a fabric block name: {name!r}")
        shm = None
        try:
            shm = _SharedMemory(name, create=True, size=size, **_UNTRACKED)  # unlinks itself if it fails
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
