"""A workload that tries to break the fabric: inserts, checksummed gets, deletes and
defragments from several processes at once, views kept alive and checked again later.

Every variable's bytes are a function of its name alone, so any process can verify any
read without being told what was written: a read that returns another variable's bytes,
bytes moved under a live view, or a half-moved extent is a bad read.  The churn test
(``tests/test_churn.py``) and the soak (``benchmarks.soak``) run the same ``churn`` loop;
it returns plain counts, so it can run in a task and its result travel back.
"""

from __future__ import annotations

import random
import time
import uuid
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from datafabric.errors import FabricError, NameNotFoundError, OutOfSpaceError

PREFIX = "ch/"
MIN_BYTES = 1 << 10
MAX_BYTES = 3 << 20
MAX_OWN = 24  # live variables an actor keeps before it deletes its oldest
MAX_HELD = 6  # views an actor keeps alive to check again later
MAX_REPORTED = 20  # bad reads described in full; the rest are only counted
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def name_for(actor: str, i: int, nbytes: int) -> str:
    """The size travels in the name, so a reader knows what to expect."""
    return f"{PREFIX}{actor}/{i}/{nbytes}"


def content(name: str) -> np.ndarray:
    """The bytes of variable ``name``: distinct per name and per 8-byte word, so a read
    from the wrong offset or of another variable differs in nearly every byte."""
    nbytes = int(name.rsplit("/", 1)[1])
    seed = np.uint64(zlib.crc32(name.encode()) | 1 << 32)
    words = np.arange(-(-nbytes // 8), dtype=np.uint64) * _GOLDEN ^ seed
    return words.view(np.uint8)[:nbytes]


def differing(name: str, view: np.ndarray) -> int:
    """How many bytes of ``view`` are not what ``name`` holds (its size counts if the
    shape is wrong)."""
    got = np.asarray(view).reshape(-1).view(np.uint8)
    want = content(name)
    if got.size != want.size:
        return max(got.size, want.size)
    return int(np.count_nonzero(got != want))


@dataclass
class Tally:
    """What one actor did and saw; ``bad`` describes the bad reads."""

    actor: str
    ops: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    bytes_checked: int = 0
    bad_reads: int = 0
    lost: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "actor": self.actor,
            "ops": dict(self.ops),
            "errors": dict(self.errors),
            "bytes_checked": self.bytes_checked,
            "bad_reads": self.bad_reads,
            "lost": self.lost,
            "bad": self.bad,
        }


class Journal:
    """An append-only file of the inserts that returned and the deletes about to be made,
    so that what a killed actor confirmed can still be checked.  No file: no journal."""

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (closed in close())

    def write(self, kind: str, name: str) -> None:
        if self._file is not None:
            self._file.write(f"{kind} {name}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_journals(paths: list[str]) -> tuple[set[str], set[str]]:
    """(names whose insert returned, names an actor set out to delete)."""
    inserted, deleted = set(), set()
    for path in paths:
        with open(path) as f:
            for line in f:
                kind, _, name = line.rstrip("\n").partition(" ")
                (inserted if kind == "I" else deleted).add(name)
    return inserted, deleted


def churn(fabric, actor: str, seed: int, seconds: float, journal: str | None = None) -> dict:
    """Run inserts, verified gets, deletes and defragments for ``seconds``; returns the
    ``Tally`` as a dict.  The actor deletes only its own names, so a get of one of them
    that finds no such name is a lost insert; other actors' names may vanish at any time.
    An own name that read wrong is left in place, so a check after the churn sees whether
    it stays wrong."""
    rng = random.Random(seed)
    tally = Tally(actor)
    log = Journal(journal)
    own: deque[str] = deque()
    held: deque[tuple[str, np.ndarray, int]] = deque()  # (name, view, op count at which to check again)
    seen: list[str] = []  # names listed recently, of every actor
    tag = f"{actor}-{uuid.uuid4().hex[:6]}" if journal else actor  # a retried task writes fresh names
    i = 0
    deadline = time.monotonic() + seconds

    def check(name: str, view: np.ndarray, when: str) -> None:
        bad = differing(name, view)
        tally.bytes_checked += view.nbytes
        if bad:
            tally.bad_reads += 1
            if name in own:  # kept, never deleted: the end shows whether it stays wrong
                own.remove(name)
            if len(tally.bad) < MAX_REPORTED:
                listed = name in fabric.get_list(name)
                tally.bad.append(
                    f"{when} {name}: {bad} of {view.nbytes} bytes differ [{'still listed' if listed else 'gone'}]"
                )

    def read(name: str, mine: bool) -> None:
        try:
            view = fabric.get(name)
        except NameNotFoundError:
            tally.ops["get-gone"] += 1
            if mine:
                tally.lost.append(name)
                own.remove(name)
            return
        tally.ops["get"] += 1
        check(name, view, "fresh")
        if rng.random() < 0.5:
            held.append((name, view, sum(tally.ops.values()) + rng.randint(5, 60)))
            if len(held) > MAX_HELD:
                old_name, old_view, _ = held.popleft()
                check(old_name, old_view, "changed-under-view")

    def delete_own() -> None:
        name = own.popleft()
        log.write("D", name)
        try:
            fabric.delete(name)
            tally.ops["delete"] += 1
        except NameNotFoundError:
            tally.lost.append(name)

    try:
        while time.monotonic() < deadline:
            roll = rng.random()
            try:
                count = sum(tally.ops.values())
                while held and held[0][2] <= count:
                    name, view, _ = held.popleft()
                    check(name, view, "changed-under-view")
                if roll < 0.35:
                    nbytes = int(MIN_BYTES * (MAX_BYTES / MIN_BYTES) ** rng.random())
                    name = name_for(tag, i, nbytes)
                    i += 1
                    try:
                        fabric.insert(name, f"churn {actor}", np.uint8, content(name))
                    except OutOfSpaceError:
                        tally.ops["insert-refused"] += 1
                        if own:
                            delete_own()
                        continue
                    log.write("I", name)
                    own.append(name)
                    tally.ops["insert"] += 1
                    if len(own) > MAX_OWN:
                        delete_own()
                elif roll < 0.55 and own:
                    read(rng.choice(own), mine=True)
                elif roll < 0.75:
                    if not seen or rng.random() < 0.1:
                        seen = fabric.get_list(PREFIX)
                        tally.ops["list"] += 1
                    if seen:
                        name = rng.choice(seen)
                        read(name, mine=name in own)
                elif roll < 0.9 and own:
                    delete_own()
                elif roll >= 0.9:
                    fabric.defragment()
                    tally.ops["defragment"] += 1
            except (FabricError, OSError) as exc:  # a worker died under the request, say
                tally.errors[type(exc).__name__] += 1
            except Exception as exc:  # not a FabricError: a defect of its own, and the churn goes on
                tally.errors[f"unexpected {type(exc).__name__}"] += 1
                if len(tally.bad) < MAX_REPORTED:
                    tally.bad.append(f"unexpected {exc!r}")
        while held:
            name, view, _ = held.popleft()
            check(name, view, "changed-under-view")
    finally:
        log.close()
    return tally.as_dict()


def defragment_loop(fabric, seconds: float, pause: float = 0.0) -> dict:
    """Defragment again and again for ``seconds``: the compaction that reads race."""
    tally = Tally("defragmenter")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fabric.defragment()
            tally.ops["defragment"] += 1
        except (FabricError, OSError) as exc:
            tally.errors[type(exc).__name__] += 1
        except Exception as exc:  # not a FabricError: a defect of its own
            tally.errors[f"unexpected {type(exc).__name__}"] += 1
        time.sleep(pause)
    return tally.as_dict()


def everywhere(client, actor, fabric, seed: int, seconds: float, per_worker: int = 2) -> dict:
    """``actor(fabric, tag, seed, seconds)`` in ``per_worker`` tasks on each worker and in
    the client at once; the counts of the tallies they return, summed."""
    workers = sorted(client.scheduler_info()["workers"])
    futures = [
        client.submit(actor, fabric, f"w{w}t{t}", seed + 10 * (w + 1) + t, seconds, workers=[address], pure=False)
        for w, address in enumerate(workers)
        for t in range(per_worker)
    ]
    tallies = [actor(fabric, "client", seed, seconds), *client.gather(futures)]
    return {k: sum(t[k] for t in tallies) for k in tallies[0]}


def total(tallies: list[dict]) -> dict:
    """The tallies of several actors summed."""
    out = {"actors": len(tallies), "ops": Counter(), "errors": Counter(), "bytes_checked": 0, "bad_reads": 0}
    out["lost"], out["bad"] = [], []
    for t in tallies:
        out["ops"].update(t["ops"])
        out["errors"].update(t["errors"])
        out["bytes_checked"] += t["bytes_checked"]
        out["bad_reads"] += t["bad_reads"]
        out["lost"] += t["lost"]
        out["bad"] += [f"[{t['actor']}] {b}" for b in t["bad"]]
    return out


def summary(tot: dict) -> str:
    ops = sum(tot["ops"].values())
    gets = tot["ops"]["get"]
    lines = [
        f"churn: {tot['actors']} actors, {ops} ops {dict(sorted(tot['ops'].items()))}",
        f"  errors {dict(tot['errors'])}, {tot['bytes_checked'] / 2**20:.0f} MiB checked",
        f"  bad reads: {tot['bad_reads']} in {gets} gets; confirmed inserts lost: {len(tot['lost'])}",
        *(f"  {b}" for b in tot["bad"][:MAX_REPORTED]),
        *(f"  lost {n}" for n in tot["lost"][:MAX_REPORTED]),
    ]
    return "\n".join(lines)


def verify_listed(fabric) -> list[str]:
    """Every listed churn variable read once more; the description of each that is wrong."""
    wrong = []
    for name in fabric.get_list(PREFIX):
        try:
            view = fabric.get(name)
        except NameNotFoundError:
            continue  # deleted meanwhile
        bad = differing(name, view)
        if bad:
            wrong.append(f"{name}: {bad} of {view.nbytes} bytes differ")
    return wrong
