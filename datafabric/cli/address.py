"""Where the scheduler is, and a connection to it and to its fabric.

Which scheduler a command talks to: ``--scheduler``, else ``DASK_SCHEDULER_ADDRESS``
(Dask's ``scheduler-address`` setting), else the address that a running
``datafabric start`` on this machine left in its state file.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import distributed

import datafabric
from datafabric.cli.app import CliError
from datafabric.cli.probe import require_scheduler
from datafabric.errors import NoFabricError


def state_path() -> Path:
    """Where a running embedded ``datafabric start`` leaves its scheduler's address:
    ``$XDG_RUNTIME_DIR/datafabric/scheduler``, else the same under ``$XDG_CACHE_HOME``
    or ``~/.cache``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "datafabric" / "scheduler"


def running_start_address() -> str | None:
    """The address in the state file while the ``start`` that wrote it runs.  That
    ``start`` holds an exclusive lock on the file for as long as it lives, so a file
    left behind by a killed ``start`` is recognised as stale and ignored."""
    try:
        fd = os.open(state_path(), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 4096).decode().strip() or None
        return None
    finally:
        os.close(fd)


class StateFile:
    """The state file of a running embedded ``start``: created locked, mode 0600, and
    removed when the ``start`` ends."""

    def __init__(self) -> None:
        self.path = state_path()
        address = running_start_address()
        if address is not None:
            raise CliError(
                f"a `datafabric start` is running already at {address} (state file {self.path}); "
                "stop it with `datafabric stop`, or use `datafabric start --run SCRIPT`, which needs no state file"
            )
        self._fd: int | None = None

    def publish(self, address: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it is visible: never read as stale
        os.write(fd, f"{address}\n".encode())
        os.replace(tmp, self.path)
        self._fd = fd

    def remove(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def resolve_address(given: str | None) -> str:
    if given:
        return given
    configured = dask.config.get("scheduler-address", None)
    if configured:
        return str(configured)
    address = running_start_address()
    if address:
        return address
    raise CliError(
        "no fabric running: no scheduler given and no `datafabric start` is running on this machine; "
        "pass --scheduler ADDRESS, set DASK_SCHEDULER_ADDRESS, or start one with `datafabric start --mb N`"
    )


@contextmanager
def connected_client(address: str, timeout: float) -> Iterator[distributed.Client]:
    """A client of the scheduler, or one clear line if no scheduler answers in time
    (see ``probe``): a ``Client`` that fails to connect prints a traceback of its own
    when it is collected."""
    require_scheduler(address, timeout)
    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # failures surface as exceptions
    client = distributed.Client(address, timeout=timeout, set_as_default=False)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def connected_fabric(scheduler: str | None, timeout: float) -> Iterator[datafabric.Fabric]:
    address = resolve_address(scheduler)
    with connected_client(address, timeout) as client:
        try:
            fabric = datafabric.connect(client)
        except NoFabricError:
            raise CliError(
                f"no fabric is running on {address}; start one with `datafabric start --mb N --scheduler {address}`"
            ) from None
        yield fabric
