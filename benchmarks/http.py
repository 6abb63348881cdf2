"""``GET data/`` of a 1 GiB variable over loopback, against Python's ``http.server``
serving the same bytes from a file in /dev/shm (``python -m benchmarks.http [--quick]``).

Both servers are read by the same plain HTTP client (``http.client``, ``readinto`` a
preallocated buffer in 1 MiB pieces), in a process of its own so that neither server
shares its interpreter with the client.  The fabric's response comes from a read-only
mapping of the block in the scheduler's process (it is on the block's machine), written
to the socket in 8 MiB pieces under a lease.  Rounds alternate the two servers; medians
and the ratio fabric / http.server (GB/s) are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

GiB = 2**30


def client(url: str, nbytes: int) -> float:
    """Seconds to read the whole body of ``url`` (run in its own process)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    buf = bytearray(2**20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
    r = conn.getresponse()
    got = 0
    while n := r.readinto(view):
        got += n
    elapsed = time.perf_counter() - t0
    conn.close()
    if r.status != 200 or got != nbytes:
        raise SystemExit(f"{url}: status {r.status}, {got} of {nbytes} bytes")
    return elapsed


def timed(url: str, nbytes: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.http", "--client", url, "--nbytes", str(nbytes)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(client(args.client, args.nbytes))
        return
    from distributed import Client, LocalCluster

    import datafabric

    nbytes = GiB // 4 if args.quick else GiB
    rounds = 3 if args.quick else args.rounds
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bench_http_") as files,
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster,
        Client(cluster) as c,
    ):
        fabric = datafabric.start(c, mb=nbytes / 2**20 + 16)
        try:
            fabric.insert("bench/http", "", np.uint8, data)
            with open(os.path.join(files, "bench.bin"), "wb") as f:
                f.write(data.data)
            del data
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", files, str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                baseline_url = f"http://127.0.0.1:{port}/bench.bin"
                fabric_url = f"http://127.0.0.1:{cluster.scheduler.http_server.port}/fabric/api/v1/data/bench/http"
                for _ in range(100):  # until http.server answers
                    try:
                        timed(baseline_url, nbytes)
                        break
                    except subprocess.CalledProcessError:
                        time.sleep(0.1)
                timed(fabric_url, nbytes)  # warm-up
                samples: dict[str, list[float]] = {"fabric": [], "http.server": []}
                for _ in range(rounds):
                    samples["fabric"].append(nbytes / timed(fabric_url, nbytes) / 1e9)
                    samples["http.server"].append(nbytes / timed(baseline_url, nbytes) / 1e9)
            finally:
                server.terminate()
                server.wait()
        finally:
            fabric.shutdown()
    medians = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "nbytes": nbytes,
        "rounds": rounds,
        "GB/s": samples,
        "median GB/s": medians,
        "ratio": medians["fabric"] / medians["http.server"],
    }
    print(f"GET {nbytes / GiB:g} GiB over loopback, {rounds} rounds (GB/s, median [min, max]):")
    for k, v in samples.items():
        print(f"  {k:12s} {medians[k]:6.2f}  [{min(v):.2f}, {max(v):.2f}]")
    print(f"  ratio fabric / http.server: {result['ratio']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
