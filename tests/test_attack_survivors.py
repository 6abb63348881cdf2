"""A task holding views through two scheduler crashes in a row (``worker_plugin/survivors.py``).

The first restarted scheduler is SIGKILLed too, once the closing worker's process has
declared its task's views to it.  Those leases died with it; the third incarnation must be
told again (by a new declaration), before the block is taken back and compacted, deleted
and filled around the views.  The task's checksums never change, and once the old
process is gone all the memory comes back.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from distributed import Client

import datafabric
from tests.test_restart_kept_views import (
    digest,
    fill_up,
    insert_here,
    processes,  # noqa: F401 (the fixture)
    quietly,
    waiting_declarations,
    watch,
)
from tests.waiting import wait_for


def test_views_a_task_holds_through_two_scheduler_crashes_are_declared_to_the_third(processes, tmp_path):  # noqa: F811
    rng = np.random.default_rng(12)
    data = {"gap": np.zeros(100_000), "held": rng.random(200_000), "after": np.ones(1000)}
    expected = digest(data["held"])
    started, stop, out = (str(tmp_path / n) for n in ("started", "stop", "out.json"))

    with Client(processes.address, timeout=90) as client:
        client.wait_for_workers(1)
        fabric = datafabric.start(client, mb=32)
        client.submit(insert_here, fabric, data).result()
        fabric.delete("gap")  # a hole before "held": a compaction would move an unleased "held" into it
        running = client.submit(watch, fabric, ["held"], "after", started, stop, out, pure=False)
        wait_for(lambda: os.path.exists(started), "the task to hold its views")

        closing = processes.lose_scheduler()
        crashed = time.time()
        del running
        processes.start_scheduler()
        wait_for(
            lambda: quietly(lambda: client.run_on_scheduler(waiting_declarations), 0) == 2,
            "the closing worker to declare its views to the second scheduler",
        )
        processes.lose_scheduler()  # the second one dies too, with the declared leases
        processes.start_scheduler()
        wait_for(
            lambda: quietly(lambda: client.run_on_scheduler(waiting_declarations), 0) == 2,
            "the closing worker to declare its views to the third scheduler",
            timeout=15,
        )
        assert all(p.poll() is None for p in closing), "the old worker must still be running its task"
        processes.start_workers()
        client.wait_for_workers(1)
        wait_for(lambda: set(quietly(fabric.get_list, [])) == {"held", "after"}, "the block to be taken back")

        assert "held" not in fabric.defragment()["moved"]  # leased by the new declaration
        fabric.delete("held")
        assert client.submit(fill_up, fabric, pure=False).result() > 0
        used = sum(b["used"] for b in fabric.status())

        with open(stop, "w") as f:
            f.write("stop")
        for proc in closing:
            proc.wait(60)
        assert os.path.exists(out), f"the old worker exited before its task ended, {time.time() - crashed:.0f} s on"
        with open(out) as f:
            found = json.load(f)
        assert found["seen"] == {"held": [expected]}, "the bytes under a held view changed"
        wait_for(
            lambda: sum(b["used"] for b in fabric.status()) <= used - data["held"].nbytes,
            "the held variable to be freed once the old process was gone",
        )
        for name in fabric.get_list():
            fabric.delete(name)
        wait_for(lambda: all(b["used"] == 0 for b in fabric.status()), "space still used after deleting everything")
        fabric.shutdown()
