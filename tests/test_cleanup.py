"""`datafabric cleanup` removes only segments proven dead.  Each test names the segments
it made, so that cleanup never touches another fabric's blocks on a shared machine."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from datafabric import layout
from datafabric.cleanup import MIN_AGE
from datafabric.shm import Segment, new_block_name
from tests.cli_helpers import assert_fails, env_for, run_many


def block(fabric_id: uuid.UUID, *, header: bool = True) -> str:
    name = new_block_name(fabric_id, "cleanup-node")
    segment = Segment.create(name, 4096)
    if header:
        layout.write_block_header(segment.buf, layout.BlockHeader(uuid.uuid4(), fabric_id, "cleanup-node", 4096))
    segment.close()
    return name


@pytest.fixture(scope="module")
def aged(fabric_module):
    """Segments older than MIN_AGE: a running fabric's orphan, a crashed fabric's block,
    a durable fabric's, one with no header, and one this process keeps mapped."""
    live_id = uuid.UUID(fabric_module.fabric_id)
    names = {
        "orphan": block(live_id),
        "crashed": block(uuid.uuid4()),
        "durable": block(uuid.uuid5(uuid.NAMESPACE_URL, "datafabric:tcp://127.0.0.1:1")),
        "headless": block(uuid.uuid4(), header=False),
        "mapped": block(uuid.uuid4()),
    }
    mapping = Segment.attach(names["mapped"])
    time.sleep(MIN_AGE + 0.5)
    yield names
    mapping.close()
    for name in names.values():
        if os.path.exists(f"/dev/shm/{name}"):
            Segment.attach(name).unlink()


@pytest.fixture(scope="module")
def fabric_module(client):
    import datafabric

    fabric = datafabric.start(client, mb=8)
    yield fabric
    fabric.shutdown()


def test_cleanup_removes_only_what_it_proves_dead(aged, fabric_module, tmp_path):
    young = block(uuid.uuid4())
    env = env_for(tmp_path)
    names = [*aged.values(), young]
    try:
        refused, dry, forget = run_many(
            env,
            ["cleanup", *names],
            ["cleanup", "--dry-run", "--json", "--scheduler", fabric_module.address, *names],
            ["cleanup", "--dry-run", "--json", "--none-running", "--forget-durable", aged["durable"]],
        )
        assert_fails(refused, "no scheduler to ask")
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
        report = json.loads(dry.stdout)
        assert report["stale"] == [aged["crashed"]] and report["removed"] == []
        kept = report["kept"]
        assert kept[aged["orphan"]] == "its fabric is running"
        assert "durable" in kept[aged["durable"]] and "header does not read" in kept[aged["headless"]]
        assert kept[aged["mapped"]] == "a process maps it" and "may be being created" in kept[young]
        assert json.loads(forget.stdout)["stale"] == [aged["durable"]]
        [done] = run_many(env, ["cleanup", "--scheduler", fabric_module.address, *names])
        assert done.returncode == 0, done.stderr
        assert aged["crashed"] in done.stdout and not os.path.exists(f"/dev/shm/{aged['crashed']}")
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names if n != aged["crashed"])
    finally:
        Segment.attach(young).unlink()
