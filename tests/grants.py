"""A worker's local reads without a cluster (``LocalReads`` on a real block), and the
churn its unit tests share: threads taking views under local leases while this thread
recalls, so that every count a recall reports can be checked against the releases sent."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import numpy as np

from datafabric.views import LocalState
from tests.blocks import FABRIC, NODE
from worker_plugin.local_reads import LocalReads


def setup(segment, sent: list, later: list | None = None) -> tuple[LocalReads, dict]:
    """``later`` collects what would run on the event loop (the use reports)."""
    reads = LocalReads(
        LocalState(FABRIC.hex), NODE, "worker-b", sent.append, (later if later is not None else []).append
    )
    entry = {
        "var_id": 7,
        "name": "x",
        "type": "1000 * uint8",
        "shm_id": segment.name.lstrip("/"),
        "data_offset": 4096,
        "extent_id": 1,
    }
    return reads, entry


def recall(reads: LocalReads, var_id: int) -> list:
    answers: list = []
    reads.recall(1, [var_id], answers.append)
    return answers[0]["leases"]


def churn_against_recalls(
    take: Callable[[np.random.Generator], list | None], recall_round: Callable[[int], int], rounds: int = 200
) -> tuple[int, list]:
    """Four threads run ``take`` (views under local leases, or None when there are none
    to take) and keep some of its views, dropping others, while this thread runs
    ``recall_round`` ``rounds`` times (each returns the count its recalls reported).
    Returns the total reported and the views still kept, after a collection."""
    stop = threading.Event()
    alive: list = []
    lock = threading.Lock()

    def churn(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            views = take(rng)
            if views is None:
                continue
            with lock:
                if rng.random() < 0.3:
                    alive.extend(views)
                elif alive:
                    del alive[: int(rng.integers(0, len(alive) + 1))]

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    try:
        reported = sum(recall_round(i) for i in range(rounds))
    finally:
        stop.set()
        for t in threads:
            t.join()
    gc.collect()
    return reported, alive
