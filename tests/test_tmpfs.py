"""A real, small, full tmpfs.  The fabric runs in a private mount namespace whose
/dev/shm is a 64 MiB tmpfs, so filling it costs this machine nothing and the kernel's
own ENOSPC, after part of a block got its pages, is what the fabric meets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MiB = 2**20
TMPFS_MB = 64
ROOT = Path(__file__).resolve().parent.parent


def scenario() -> None:
    """Runs inside the namespace; any failed assertion is a non-zero exit."""
    from distributed import Client

    import datafabric
    from datafabric import errors, layout
    from datafabric.shm import fabric_segments
    from tests.conftest import local_cluster

    def check(fabric, data):
        for name, array in data.items():
            np.testing.assert_array_equal(fabric.get(name), array, err_msg=name)
        assert all(s["free"] + s["used"] == s["capacity"] and s["reserved"] == 0 for s in fabric.status())

    with (
        local_cluster() as c,
        Client(c) as client,
    ):
        fabric = datafabric.start(client, mb=32)
        data = {f"v{i}": np.random.default_rng(i).random(MiB // 8) for i in range(8)}
        for name, array in data.items():
            fabric.insert(name, "", np.float64, array)
        before = fabric_segments()

        # 2 x 24 MiB with about 32 MiB free: one block gets its pages, the other runs out
        with pytest.raises(errors.OutOfSpaceError, match="No space left on device|free space of /dev/shm"):
            fabric.allocate(48)
        assert fabric_segments() == before
        check(fabric, data)

        fabric.allocate(24)  # 2 x 12 MiB: fits; the tmpfs is now nearly full
        with pytest.raises(errors.OutOfSpaceError):
            fabric.allocate(16)
        # every byte of the new blocks is really there: filling them takes no SIGBUS
        largest = max(s["largest_free"] for s in fabric.status())
        big = np.full((largest - 2 * layout.PAGE) // 8, 3.0)  # less its header and page alignment
        fabric.insert("fills-a-block", "", np.float64, big)
        data["fills-a-block"] = big
        check(fabric, data)

        for name in fabric.get_list():
            fabric.delete(name)
        assert all(s["free"] == s["capacity"] for s in fabric.status())
        fabric.shutdown()
        assert fabric_segments() == []
    print("tmpfs scenario passed")


def test_a_full_small_tmpfs_is_an_error_at_allocate_and_loses_nothing():
    unshare = shutil.which("unshare")
    namespace = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c"]
    mount = f"mount -t tmpfs -o size={TMPFS_MB}m,mode=1777 tmpfs /dev/shm"
    if unshare is None or subprocess.run([*namespace, mount], capture_output=True).returncode:
        pytest.skip("needs unshare, user namespaces and a tmpfs mount in them")
    script = f'{mount} && exec "{sys.executable}" -c "import tests.test_tmpfs as t; t.scenario()"'
    done = subprocess.run(
        [*namespace, script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "tmpfs scenario passed" in done.stdout
