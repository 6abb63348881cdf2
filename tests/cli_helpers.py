"""What the command-line tests share: the real `datafabric` executable run in
subprocesses with their own state directory, bounded waits, and the one-line error check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import fabric_segments
from tests.waiting import wait_for

BIN = Path(sys.executable).parent
DATAFABRIC = str(BIN / "datafabric")
DASK = str(BIN / "dask")
WAIT = 60  # seconds: the bound on every subprocess and every condition waited for


def env_for(runtime_dir: Path) -> dict[str, str]:
    """Commands that find the fabric only through --scheduler or this state directory."""
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    return env | {"XDG_RUNTIME_DIR": str(runtime_dir), "COLUMNS": "80"}


def run_many(env: dict[str, str], *commands: list[str], cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """Independent commands at once: most of each one's time is Python importing Dask."""
    procs = [
        subprocess.Popen([DATAFABRIC, *c], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        results = []
        for command, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=WAIT)
            results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)


def run(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_many(env, list(args), cwd=cwd)[0]


def ok_many(env: dict[str, str], *commands: list[str]) -> list[str]:
    results = run_many(env, *commands)
    for result in results:
        assert result.returncode == 0, (result.args, result.stderr)
    return [result.stdout for result in results]


def ok(env: dict[str, str], *args: str) -> str:
    return ok_many(env, list(args))[0]


def assert_fails(result: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> None:
    """One `error: ...` line on stderr, the given exit status, no traceback."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def segments_of(fabric_id: str) -> list[str]:
    return [s for s in fabric_segments() if s.startswith(f"dfab_{fabric_id[:8]}_")]


def end(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Signal a process and wait for it; kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
            raise
    return proc.returncode


@dataclass
class Start:
    """A `datafabric start` running in the background, with its own state directory."""

    proc: subprocess.Popen
    env: dict[str, str]
    home: Path
    address: str

    @property
    def state_file(self) -> Path:
        return self.home / "datafabric" / "scheduler"

    @property
    def out(self) -> str:
        return (self.home / "start.out").read_text()

    @property
    def err(self) -> str:
        return (self.home / "start.err").read_text()


def launch(home: Path, *args: str, new_session: bool = False) -> Start:
    env = env_for(home)
    cmd = [DATAFABRIC, "start", "--dashboard-address", "127.0.0.1:0", *args]
    with (home / "start.out").open("wb") as out, (home / "start.err").open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=err, start_new_session=new_session)
    start = Start(proc, env, home, "")
    try:
        wait_for(lambda: start.state_file.exists() or proc.poll() is not None, "the state file")
        assert proc.poll() is None, start.err
    except BaseException:
        end(proc)
        raise
    start.address = start.state_file.read_text().strip()
    return start


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
