"""``GET data/`` of a dataset against the same bytes as one variable, over loopback
(``python -m benchmarks.http_datasets [--quick]``).

The same-run baseline is the variable: a dataset's answer is assembled run by run from
its chunks (each filled, then copied into), where a variable's is written from the
mapping with no copy, so the ratio is the price of assembly.  Three reads: the whole
dataset, a column band (``slice=:,0:N/4``: every chunk row, a quarter of the chunks) and
a strided one (``slice=::2,::2``).  Each GET is read by ``benchmarks.http``'s client in
a process of its own; rounds alternate; medians and ratios are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from benchmarks.http import timed

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    import datafabric

    side = 2048 if args.quick else 4096  # float64: 32 MiB or 128 MiB
    rounds = 3 if args.quick else args.rounds
    data = np.random.default_rng(0).random((side, side))
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster,
        Client(cluster) as c,
    ):
        fabric = datafabric.start(c, mb=2 * data.nbytes / MiB + 64)
        try:
            fabric.insert("bench/var", "", np.float64, data)
            fabric.create_dataset("bench/ds", data=data, chunks=(256, 256))
            base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}/fabric/api/v1/data/"
            reads = {
                "variable whole": (base + "bench/var", data.nbytes),
                "dataset whole": (base + "bench/ds", data.nbytes),
                "variable :,0:N/4": (base + f"bench/var?slice=:,0:{side // 4}", data.nbytes // 4),
                "dataset :,0:N/4": (base + f"bench/ds?slice=:,0:{side // 4}", data.nbytes // 4),
                "variable ::2,::2": (base + "bench/var?slice=::2,::2", data.nbytes // 4),
                "dataset ::2,::2": (base + "bench/ds?slice=::2,::2", data.nbytes // 4),
            }
            for url, nbytes in reads.values():
                timed(url, nbytes)  # warm-up
            samples: dict[str, list[float]] = {k: [] for k in reads}
            for _ in range(rounds):
                for k, (url, nbytes) in reads.items():
                    samples[k].append(nbytes / timed(url, nbytes) / 1e9)
        finally:
            fabric.shutdown()
    medians = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {
        what: medians[f"dataset {what}"] / medians[f"variable {what}"] for what in ("whole", ":,0:N/4", "::2,::2")
    }
    result = {"nbytes": data.nbytes, "rounds": rounds, "GB/s": samples, "median GB/s": medians, "ratio": ratios}
    print(f"GET of a {data.nbytes / MiB:g} MiB float64 {side}x{side}, chunks 256x256, {rounds} rounds (GB/s):")
    for k, v in samples.items():
        print(f"  {k:18s} {medians[k]:6.2f}  [{min(v):.2f}, {max(v):.2f}]")
    for what, r in ratios.items():
        print(f"  ratio dataset / variable, {what}: {r:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
