"""Unfilled homes attacked from the threads of one process: many tickets of one holder
at once (whole-writers, part-writers and ``fill_chunks`` failing half-way, of the same
chunks), with the seal started in the middle of them, over memory first covered with a
sentinel and freed.

A seal must neither hang nor take a home still unfilled: every element of the sealed
dataset is the fill value or a value some writer of it wrote there (never the sentinel,
a part-writer's value only inside its box), the writers refused are those that began
after the seal, and every byte returns once the dataset is deleted.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading

import numpy as np

import datafabric
from datafabric.datasets.writes import fill_chunks
from datafabric.errors import FabricError, OutOfSpaceError
from tests.waiting import wait_for

ROWS, COLS = 64, 256  # a chunk: 128 KiB of float64
NCHUNKS = 8
FILL, SENTINEL = -1.0, 7.25e7


def used(fabric) -> int:
    return sum(b["used"] for b in fabric.status())


def cover_with_sentinel(fabric) -> None:
    names = []
    try:
        while True:
            fabric.insert(f"whole-tickets/sentinel/{len(names)}", "", "16384 * float64", np.full(16384, SENTINEL))
            names.append(f"whole-tickets/sentinel/{len(names)}")
    except OutOfSpaceError:
        pass
    fabric.delete_many(names)


def test_tickets_of_one_process_racing_each_other_and_the_seal_leave_only_fill_or_written_values(client):
    fabric = datafabric.start(client, mb=8)
    try:
        before = used(fabric)
        cover_with_sentinel(fabric)
        ds = fabric.create_dataset("whole-tickets", shape=(NCHUNKS * ROWS, COLS), chunks=(ROWS, COLS), fillvalue=FILL)
        rng = random.Random(5)
        plan = []
        for n in range(64):
            chunk, kind = rng.randrange(NCHUNKS), rng.choice(["whole", "whole", "part", "raise"])
            r0, c0 = rng.randrange(ROWS), rng.randrange(COLS)
            box = (
                slice(chunk * ROWS + r0, chunk * ROWS + rng.randint(r0 + 1, ROWS)),
                slice(c0, rng.randint(c0 + 1, COLS)),
            )
            plan.append((kind, chunk, box, float(n + 1)))
        sealing = threading.Event()

        def write(kind: str, chunk: int, box: tuple, value: float) -> str:
            try:
                if kind == "whole":
                    ds[chunk * ROWS : (chunk + 1) * ROWS] = value
                elif kind == "part":
                    ds[box] = value
                else:

                    def fill(view, index):
                        view[: ROWS // 2] = value
                        raise RuntimeError("half-way")

                    fill_chunks(ds, [(chunk, 0)], fill)
            except RuntimeError:
                return "raised"
            except FabricError as exc:
                assert sealing.is_set(), f"{kind} refused before the seal began: {exc!r}"
                return "refused"
            return "written"

        def seal() -> None:
            sealing.set()
            ds.seal()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(write, *w) for w in plan[:40]]
            sealed = pool.submit(seal)
            futures += [pool.submit(write, *w) for w in plan[40:]]
            outcomes = [f.result(timeout=60) for f in futures]
            sealed.result(timeout=60)
        assert "written" in outcomes and "refused" in outcomes[40:], outcomes

        got = fabric.dataset("whole-tickets")[...]
        for chunk in range(NCHUNKS):
            allowed = [FILL] + [v for _, c, _, v in plan if c == chunk]  # a raiser's half in a home it found
            rows = got[chunk * ROWS : (chunk + 1) * ROWS]
            stray = ~np.isin(rows, allowed)
            assert not stray.any(), f"chunk {chunk} holds {np.unique(rows[stray])[:5]}: neither fill nor written"
        for kind, _, box, value in plan:
            if kind == "part":
                outside = np.ones(got.shape, bool)
                outside[box] = False
                assert not (got[outside] == value).any(), f"a part-writer's value {value} outside its box"
        del got, rows
        fabric.delete("whole-tickets")
        wait_for(lambda: used(fabric) == before, f"the dataset's memory to return: {fabric.status()}")
    finally:
        fabric.shutdown()


IMPORTER = """
import sys, time, numpy as np
from distributed import Client
import datafabric
from datafabric.datasets.writes import fill_chunks
client = Client(sys.argv[1])
fabric = datafabric.connect(client)
name, create = sys.argv[2], sys.argv[3] == "create"
if create:
    ds = fabric.create_dataset(name, shape=(8 * 64, 256), chunks=(64, 256), fillvalue=-1.0)
else:
    ds = fabric.dataset(name)

def fill(view, index):
    view[...] = index[0] + 1
    if index[0] == 3:
        print("filling", flush=True)
        time.sleep(60)  # SIGKILLed here, half-way through its batch

fill_chunks(ds, [(i, 0) for i in range(8)], fill)
"""


def test_an_importer_killed_mid_batch_leaves_nothing_or_the_fill_value(client, tmp_path):
    """An import's batch ticket (``fill_chunks`` of eight chunks) whose process is SIGKILLed
    half-way: had it created the dataset, the dataset ends with it (nothing visible, every
    byte back); if another process created it, the batch's chunks read as the fill value
    (its homes, unconfirmed, were filled at its departure), the dataset seals, and its
    delete returns every byte."""
    import subprocess
    import sys

    fabric = datafabric.start(client, mb=8)
    try:
        before = used(fabric)
        script = tmp_path / "importer.py"
        script.write_text(IMPORTER)
        for create in ("create", "open"):
            name = f"killed-import/{create}"
            if create == "open":
                ds = fabric.create_dataset(name, shape=(8 * 64, 256), chunks=(64, 256), fillvalue=-1.0)
            importer = subprocess.Popen(
                [sys.executable, str(script), client.scheduler.address, name, create], stdout=subprocess.PIPE, text=True
            )
            try:
                assert importer.stdout.readline().strip() == "filling"
            finally:
                importer.kill()
                importer.wait(30)
            if create == "create":
                wait_for(lambda: used(fabric) == before, f"the ended import's memory to return: {fabric.status()}")
                assert name not in fabric.datasets("killed-import")
                continue
            ds.seal()
            got = fabric.dataset(name)[...]
            assert (got == -1.0).all(), np.unique(got)
            del got
            fabric.delete(name)
            wait_for(lambda: used(fabric) == before, f"the dataset's memory to return: {fabric.status()}")
    finally:
        fabric.shutdown()
