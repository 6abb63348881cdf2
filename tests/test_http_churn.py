"""HTTP readers under churn: while the client deletes, re-inserts and compacts, readers
GET the variables and take leases and read the mapped memory as a C reader would.  Every
answer must be one version of a variable, whole; every leased mapping must keep its bytes
until the lease ends, however the fabric moves and frees around it."""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

import numpy as np

from tests.http_helpers import api

pytest_plugins = ("tests.http_helpers",)

MiB = 2**20
NAMES = [f"churn/{k}" for k in range(4)]
ROUNDS = 16  # each: a delete, two inserts, sometimes a delete and a compaction


def version_of(body: bytes | memoryview) -> int:
    """The version a body holds, or an error: every byte is the version, and it is not 0."""
    a = np.frombuffer(body, np.uint8)
    assert a.size == MiB, a.size
    v = int(a[0])
    assert v != 0 and (a == v).all(), f"a body mixes versions: {np.unique(a)[:5]}"
    return v


def get_reader(port: int, stop: threading.Event, counts: dict, errors: list) -> None:
    k = 0
    while not stop.is_set():
        k += 1
        try:
            r = api(port, "GET", f"data/{NAMES[k % len(NAMES)]}")
            if r.status == 200:
                version_of(r.body)
                counts["get"] += 1
            else:
                assert r.status == 404, (r.status, r.body)
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            errors.append(repr(exc))


def lease_reader(port: int, fabric_id: str, stop: threading.Event, counts: dict, errors: list) -> None:
    k = 0
    while not stop.is_set():
        k += 1
        try:
            r = api(port, "POST", f"lease/{NAMES[k % len(NAMES)]}", ttl=30)
            if r.status == 404:
                continue
            assert r.status == 201, r.body
            lease = r.json
            loc = lease["locations"][0]
            fd = os.open(f"/dev/shm/{loc['shm_id']}", os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            try:
                assert m[40:56] == bytes.fromhex(fabric_id)
                magic, state = struct.unpack_from("<4sI", m, loc["extent_offset"])
                assert magic == b"DFEX" and state in (2, 3), (magic, state)
                data = memoryview(m)[loc["data_offset"] : loc["data_offset"] + MiB]
                first = version_of(data)
                time.sleep(0.05)  # deletes, inserts and compactions go on meanwhile
                assert version_of(data) == first, "leased bytes changed under the lease"
                data.release()
            finally:
                m.close()
            assert api(port, "DELETE", f"lease/{lease['lease']}").status == 200
            counts["lease"] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))


def test_http_readers_under_deletes_inserts_and_compaction(hfabric, hcluster, port):
    versions = dict.fromkeys(NAMES, 1)
    for name in NAMES:
        hfabric.insert(name, "", np.uint8, np.full(MiB, 1, np.uint8))
    stop, errors = threading.Event(), []
    counts = {"get": 0, "lease": 0}
    readers = [threading.Thread(target=get_reader, args=(port, stop, counts, errors)) for _ in range(2)]
    readers += [
        threading.Thread(target=lease_reader, args=(port, hfabric.fabric_id, stop, counts, errors)) for _ in range(2)
    ]
    for t in readers:
        t.start()
    churned = 0
    try:
        while churned < ROUNDS:
            name = NAMES[churned % len(NAMES)]
            hfabric.delete(name)
            versions[name] = versions[name] % 250 + 1
            filler = np.zeros(churned % 7 * 4096 + 64, np.uint8) + 1  # extents of changing sizes, so moves happen
            hfabric.insert(f"filler/{churned}", "", np.uint8, filler)
            hfabric.insert(name, "", np.uint8, np.full(MiB, versions[name], np.uint8))
            if churned % 3 == 0:
                hfabric.delete(f"filler/{churned}")
            if churned % 5 == 0:
                hfabric.defragment()
            churned += 1
    finally:
        stop.set()
        for t in readers:
            t.join(60)
    assert not errors, errors[:5]
    assert counts["get"] > 5 and counts["lease"] > 5 and churned == ROUNDS, (counts, churned)
    yp = hcluster.scheduler.plugins["datafabric-yellowpages"]
    assert not yp.http_leases.held
    assert not any(v.leases for v in yp.directory.by_id.values())
    for name in NAMES:
        assert version_of(api(port, "GET", f"data/{name}").body) == versions[name]
