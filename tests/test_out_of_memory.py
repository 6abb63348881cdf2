"""Memory the machine does not have: a block larger than the free RAM is refused before
any page is taken, even where the tmpfs would let ``posix_fallocate`` take it (tmpfs
pages are RAM, and the OOM killer, not an error, would answer)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datafabric import errors
from datafabric.shm import ShmBudget, shm_budget
from tests.conftest import fabric_segments

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
WATCHDOG_BYTES = 2 * GiB  # shared memory the tests may see grow before they stop the scenario


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_the_budget_is_the_least_of_ram_cgroup_and_tmpfs():
    budget = shm_budget()
    assert 0 < budget.available <= min(meminfo("MemAvailable"), shutil.disk_usage("/dev/shm").free)
    assert ShmBudget(mem_available=5, cgroup_free=3, tmpfs_free=9).available == 3
    assert ShmBudget(mem_available=5, cgroup_free=None, tmpfs_free=9).available == 5
    assert ShmBudget(mem_available=-7, cgroup_free=None, tmpfs_free=9).available == 0


def test_allocate_far_above_ram_is_refused_at_once(fabric):
    before = fabric_segments()
    blocks = fabric.status()
    asked = 4 * meminfo("MemTotal")
    started = time.monotonic()
    with pytest.raises(errors.OutOfSpaceError, match="can give .* more to shared memory") as refused:
        fabric.allocate(asked / 2**20)
    assert time.monotonic() - started < 5
    assert "free RAM" in str(refused.value) and "Allocate fewer megabytes" in str(refused.value)
    assert fabric_segments() == before
    assert fabric.status() == blocks


def scenario(asked: int) -> None:
    """Runs in a mount namespace whose /dev/shm is larger than this machine's RAM."""
    from distributed import Client

    import datafabric
    from datafabric.shm import fabric_segments as segments
    from tests.conftest import local_cluster

    with local_cluster() as c, Client(c) as client:
        fabric = datafabric.start(client, mb=8)
        blocks = fabric.status()
        started = time.monotonic()
        try:
            fabric.allocate(asked / 2**20)
        except errors.OutOfSpaceError as exc:
            print("refused:", exc)
        else:
            raise AssertionError("an allocate of 4 x RAM was accepted")
        assert time.monotonic() - started < 5, "the refusal was not at once"
        assert fabric.status() == blocks
        fabric.shutdown()
        assert segments() == []
    print("scenario passed")


def test_a_tmpfs_larger_than_ram_does_not_let_allocate_take_ram_it_lacks():
    """The machine's own defect: /dev/shm sized above the RAM.  The scenario gets a
    private tmpfs of 4 x MemTotal; should the allocate start filling it, a watchdog
    stops the scenario long before the OOM killer would."""
    unshare = shutil.which("unshare")
    tmpfs_kb = 4 * meminfo("MemTotal") // 1024
    namespace = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c"]
    mount = f"mount -t tmpfs -o size={tmpfs_kb}k,mode=1777 tmpfs /dev/shm"
    if unshare is None or subprocess.run([*namespace, mount], capture_output=True).returncode:
        pytest.skip("needs unshare, user namespaces and a tmpfs mount in them")
    asked = 4 * meminfo("MemTotal")
    script = f'{mount} && exec "{sys.executable}" -c "import tests.test_out_of_memory as t; t.scenario({asked})"'
    baseline = meminfo("Shmem")
    proc = subprocess.Popen(
        [*namespace, script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    grew, deadline = 0, time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        grew = max(grew, meminfo("Shmem") - baseline)
        if grew > WATCHDOG_BYTES:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert grew <= WATCHDOG_BYTES, f"the allocate took {grew / GiB:.1f} GiB of RAM before it was stopped"
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    assert "scenario passed" in out and "can give" in out
