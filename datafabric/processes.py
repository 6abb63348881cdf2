"""Which process this is, and whether a process is still alive on this machine.

A writer that may map the block it reserved in names its process with the reservation
(``ProcessId``); if it leaves the scheduler (which is not dying), its reservation is kept
until the block's owner, a process of the block's machine, finds that process gone
(``yp/departed.py``).  "Gone" has to be proven, never guessed, or memory a live writer
copies into would go to another variable:

- another boot id: the writer runs on another machine (or an earlier boot of this one), so
  it cannot map this block at all;
- the same boot and pid namespace, and ``/proc/<pid>/stat`` is missing, says the process is
  a zombie (``Z``, ``X``: its memory is unmapped) none of whose threads runs (a main thread
  that exited reads ``Z`` while the others write on), or gives another start time (the
  pid was reused): it has exited.

A writer in another pid namespace of this machine (a container sharing /dev/shm but not
its pids) cannot be judged here: it counts as alive, and its reservation stays until it
seals or aborts it.  The process named is the one that reserved: a child forked later that
writes through the mapping it inherited is not.
"""

from __future__ import annotations

import logging
import os

from datafabric.messages import ProcessId

logger = logging.getLogger("datafabric")

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_DEAD_STATES = ("Z", "X")
_this: ProcessId | None = None


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat``; None if the process does not exist or has exited
    (a zombie waits only for its parent to read its status: it maps nothing).  The state
    there is its main thread's: a main thread that exited (``pthread_exit``) while others
    run reads ``Z`` too, but the process lives and maps what it mapped, so a zombie is
    exited only if none of its threads runs."""
    started = _stat(f"/proc/{pid}/stat")
    if started is None:
        return None
    state, start = started
    if state in _DEAD_STATES and not _a_thread_runs(pid):
        return None
    return start


def _stat(path: str) -> tuple[str, int] | None:
    """(state, start time): fields 3 and 22 of a ``stat`` file; None if it is gone."""
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[0].decode(), int(fields[19])


def _a_thread_runs(pid: int) -> bool:
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(
        (got := _stat(f"/proc/{pid}/task/{tid}/stat")) is not None and got[0] not in _DEAD_STATES for tid in threads
    )


def this_process() -> ProcessId | None:
    """This process's identity (None where /proc does not say it: such a writer's
    reservations end at its departure, as before identities existed)."""
    global _this
    pid = os.getpid()
    if _this is None or _this["pid"] != pid:  # a forked child is another process
        try:
            with open(_BOOT_ID) as f:
                boot = f.read().strip()
            started = start_time(pid)
            _this = (
                None
                if started is None
                else ProcessId(boot=boot, pid_ns=os.readlink("/proc/self/ns/pid"), pid=pid, started=started)
            )
        except OSError:
            _this = None
    return _this


def gone(process: ProcessId) -> bool:
    """Proven no longer running on this machine (see the module's docstring)."""
    here = this_process()
    if here is None or process["boot"] != here["boot"]:
        return here is not None
    if process["pid_ns"] != here["pid_ns"]:
        logger.warning("cannot tell whether process %d of pid namespace %s is alive", process["pid"], process["pid_ns"])
        return False
    return start_time(process["pid"]) != process["started"]


def processes_gone(processes: list[ProcessId]) -> list[bool]:
    """The block owner's handler: ``gone`` for each (asked by the YellowPages)."""
    return [gone(p) for p in processes]
