"""The C reader (``native/``) compiled and run against a live fabric: it prints what numpy
reads, for several dtypes and shapes, refuses a deleted name clearly, and releases its lease."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.http_helpers import api

pytest_plugins = ("tests.http_helpers",)

NATIVE = Path(__file__).resolve().parent.parent / "native"


@pytest.fixture(scope="module")
def dfcat(tmp_path_factory):
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build native/dfcat.c; install gcc or clang")
    out = tmp_path_factory.mktemp("native") / "dfcat"
    sources = [str(NATIVE / "dfcat.c"), str(NATIVE / "datafabric.c")]
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-o", str(out), *sources, "-lrt"], check=True)
    return out


def run(dfcat, port, name, count=10):
    return subprocess.run(
        [str(dfcat), "-s", f"127.0.0.1:{port}", "-n", str(count), name], capture_output=True, text=True, timeout=60
    )


def parse(line: str, dtype: np.dtype):
    if dtype.kind == "b":
        return line == "true"
    if dtype.kind == "c":
        re, im = map(float, line.split())
        return complex(dtype.type(re)) + 1j * complex(dtype.type(im)).real
    return dtype.type(float(line) if dtype.kind == "f" else int(line))


@pytest.mark.parametrize(
    "dtype, shape",
    [
        ("float64", (40, 20)),
        ("float32", (7,)),
        ("int64", (3, 4, 5)),
        ("int16", (100,)),
        ("uint8", (2, 3)),
        ("uint64", (5,)),
        ("bool", (6,)),
        ("complex128", (4,)),
    ],
)
def test_dfcat_prints_what_numpy_reads(dfcat, hfabric, port, dtype, shape):
    rng = np.random.default_rng(7)
    a = (rng.standard_normal(shape) * 1000).astype(dtype) if dtype != "bool" else rng.random(shape) > 0.5
    if dtype == "uint64":
        a = np.array([0, 1, 2**63, 2**64 - 1, 12345], np.uint64)
    if dtype == "complex128":
        a = a + 1j * rng.standard_normal(shape)
    hfabric.insert("run1/ä x", "", a.dtype, a)
    r = run(dfcat, port, "run1/ä x", count=12)
    assert r.returncode == 0, r.stderr
    head, *lines = r.stdout.splitlines()
    assert head.startswith(f"# run1/ä x: {hfabric.info('run1/ä x')['type']} (node ")
    expected = a.ravel()[:12]
    assert len(lines) == len(expected)
    assert [parse(line, a.dtype) for line in lines] == list(expected)
    hfabric.delete("run1/ä x")


def test_dfcat_releases_its_lease(dfcat, hfabric, hcluster, port):
    hfabric.insert("x", "", np.float64, np.arange(5.0))
    assert run(dfcat, port, "x").returncode == 0
    var = hcluster.scheduler.plugins["datafabric-yellowpages"].directory.lookup("x")
    assert not var.leases
    assert not hcluster.scheduler.plugins["datafabric-yellowpages"].http_leases.held


def test_dfcat_refuses_a_deleted_name(dfcat, hfabric, port):
    hfabric.insert("gone", "", np.float64, np.arange(5.0))
    hfabric.delete("gone")
    r = run(dfcat, port, "gone")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("dfcat: gone: no variable named 'gone'"), r.stderr


def test_dfcat_refuses_a_closed_port_and_bad_arguments(dfcat, hfabric, port):
    r = subprocess.run([str(dfcat), "-s", "127.0.0.1:1", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot connect to the scheduler's HTTP server at 127.0.0.1:1" in r.stderr
    r = subprocess.run([str(dfcat), "-s", "nowhere", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    assert api(port, "GET", "names").json["total"] == 0
