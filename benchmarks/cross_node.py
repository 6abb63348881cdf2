"""A fabric view that Dask moves to a worker of another node, against a plain numpy array
of the same size moved the same way, on two simulated nodes; and what the serialiser's
check of the peer's node costs a view that stays on its node.

Since ``datafabric.handshake``, a view crossing nodes travels as its bytes, sent from the
mapping, instead of a reference the receiver's event loop would turn back into bytes by
reading them from a worker of the other node.  ``moved``: the client's wall time of a
task on node B whose argument is the result of a task on node A (a slice of a variable,
or a plain array), the result computed and waited for first, untimed.  ``serialise``:
in a worker of node A, ``dask_serialize`` of a small view with a context naming a peer on
A (a reference), with no context (a reference, the path before this check), and naming
a peer on B (the bytes), nanoseconds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from distributed import Client

import datafabric
from benchmarks.remote import NODES, two_nodes
from benchmarks.timing import per_call_ns, summary


def insert_on(fabric: datafabric.Fabric, name: str, nbytes: int) -> None:
    fabric.insert(name, "", np.float64, np.ones(nbytes // 8))


def view_of(fabric: datafabric.Fabric, name: str) -> np.ndarray:
    return fabric.get(name)[1:]


def plain_of(nbytes: int) -> np.ndarray:
    return np.ones(nbytes // 8)[1:]


def touch(x: np.ndarray) -> float:
    return float(x[0] + x[-1])


def serialise_ns(fabric: datafabric.Fabric, name: str, calls: int) -> dict:
    from datafabric.handshake import HANDSHAKE_KEY
    from datafabric.references import _serialize

    view = fabric.get(name)[1:100]
    contexts = {
        "same_node": {"recipient": {HANDSHAKE_KEY: NODES[0]}},
        "no_context": None,
        "other_node": {"recipient": {HANDSHAKE_KEY: NODES[1]}},
    }
    return {how: statistics.median(per_call_ns(lambda c=c: _serialize(view, c), calls)) for how, c in contexts.items()}


def run(nbytes: int, repeat: int, calls: int) -> dict:
    with two_nodes() as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        env = client.run(lambda: __import__("dask").config.get("datafabric.node-id"))
        a = next(w for w, n in env.items() if n == NODES[0])
        b = next(w for w, n in env.items() if n == NODES[1])
        fabric = datafabric.start(client, mb=2 * 3 * nbytes / 2**20)
        try:
            client.submit(insert_on, fabric, "bench/moved", nbytes, workers=[a], pure=False).result()
            samples: dict[str, list[float]] = {"view": [], "plain": []}
            for i in range(repeat + 1):  # the first round warms connections up
                for how, fn, args in (("view", view_of, (fabric, "bench/moved")), ("plain", plain_of, (nbytes,))):
                    source = client.submit(fn, *args, workers=[a], pure=False)
                    source.result()
                    t0 = time.perf_counter()
                    client.submit(touch, source, workers=[b], pure=False).result()
                    if i:
                        samples[how].append(time.perf_counter() - t0)
                    del source
            serialise = client.submit(serialise_ns, fabric, "bench/moved", calls, workers=[a], pure=False).result()
        finally:
            fabric.shutdown()
    result = {k: summary(v) for k, v in samples.items()}
    result["serialise_ns"] = serialise
    result["nbytes"] = nbytes
    return result


def table(result: dict) -> str:
    view, plain = result["view"]["median"], result["plain"]["median"]
    ser = result["serialise_ns"]
    return "\n".join(
        [
            f"moved to another node, {result['nbytes'] / 2**20:.0f} MiB, median wall: view {view * 1e3:.1f} ms, "
            f"plain array {plain * 1e3:.1f} ms, ratio view/plain {view / plain:.2f}",
            f"serialise a view (median ns): same node {ser['same_node']:.0f}, no context {ser['no_context']:.0f} "
            f"(ratio {ser['same_node'] / ser['no_context']:.2f}), other node (bytes) {ser['other_node']:.0f}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 256 MiB, fewer repetitions")
    args = parser.parse_args()
    nbytes, repeat, calls = (64 * 2**20, 3, 2_000) if args.quick else (256 * 2**20, 9, 20_000)
    result = run(nbytes, repeat, calls)
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
