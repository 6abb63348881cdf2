"""The attacks on chunks kept in columns (``yp/chunk_columns.py``) share this: an audit of
the scheduler's records, the owners' figures, and views of chunks kept in a worker or the
client with their expected bytes.

``audit`` runs on the scheduler and builds nothing: no chunk both in columns and in
``variables``/``by_id``, the sorted index and its dict agree, no lease of a process that
left, no publication of an unknown variable, and every block's ``used`` exactly the sum of
the extents recorded in it (materialised copies, chunks in columns, reservations).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

import cloudpickle
import dask
import numpy as np
from distributed import get_worker

from datafabric.errors import OutOfSpaceError
from datafabric.names import chunk_name
from datafabric.protocol import SCHEDULER_PLUGIN
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHUNK = 4096  # float64 elements a chunk: 32 KiB
N = 24  # chunks a dataset


# -- the scheduler's side ------------------------------------------------------------------
def audit(dask_scheduler) -> dict:
    """Runs on the scheduler, building nothing: what breaks the columns' promise."""
    return audit_directory(dask_scheduler.plugins[SCHEDULER_PLUGIN].directory)


def audit_directory(d) -> dict:
    """``audit`` of a ``yp.directory.Directory``."""
    from yp.chunk_columns import GONE

    problems: list = []
    used: Counter[str] = Counter()
    for var in dict.values(d.by_id):
        for c in var.copies:
            used[c.shm_id] += c.extent_size
    for name, var in dict.items(d.variables):
        if dict.get(d.by_id, var.var_id) is not var:
            problems.append(("named but not by id", name))
    if set(d.variables._list) != set(dict.keys(d.variables)):
        problems.append(("sorted index differs from its dict", len(d.variables._list), dict.__len__(d.variables)))
    in_columns = 0
    for columns in d.columns:
        for i in np.flatnonzero(columns.block != GONE).tolist():
            in_columns += 1
            name, var_id = columns.name(i), columns.first_id + i
            if dict.__contains__(d.variables, name) or dict.__contains__(d.by_id, var_id):
                problems.append(("two records", name))
            used[columns.shm_ids[columns.block[i]]] += int(columns.extent_size[i])
        if columns.left != int((columns.block != GONE).sum()):
            problems.append(("left miscounted", columns.dataset_id))
    for var in dict.values(d.by_id):
        if left := sorted(h for h in var.leases if h in d.departed):
            problems.append(("leased by a process that left", var.name, left))
    if dangling := [v for v in d.published if not dict.__contains__(d.by_id, v)]:
        problems.append(("published but unknown", dangling[:5]))
    for p in d.pending.values():
        used[p.copy.shm_id] += p.copy.extent_size
    for shm_id, block in d.blocks.items():
        if block.used != used.get(shm_id, 0):
            problems.append(("used", shm_id, block.used, used.get(shm_id, 0)))
    return {"problems": problems, "in_columns": in_columns, "used": sum(b.used for b in d.blocks.values())}


def checked(client) -> dict:
    found = client.run_on_scheduler(audit)
    assert not found["problems"], found["problems"]
    return found


def used(fabric) -> int:
    """What the blocks' owners count as used (each block's used and free adding up to it)."""
    rows = fabric.status()
    assert all(b["used"] + b["free"] == b["capacity"] for b in rows), rows
    return sum(b["used"] for b in rows)


def settled(client, fabric, expected: int) -> None:
    """The owners' figures and the directory's agree, and are ``expected``."""
    wait_for(lambda: used(fabric) == expected == checked(client)["used"], f"used == {expected}: {fabric.status()}")


# -- the data and the views ----------------------------------------------------------------
def data(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(N * CHUNK)


def expected(seed: int, flat: int) -> np.ndarray:
    return data(seed)[flat * CHUNK : (flat + 1) * CHUNK]


def kept() -> dict:
    """Views a test keeps alive in a worker (or the client) between steps: (seed, flat, how) -> view."""
    try:
        return get_worker().__dict__.setdefault("_dfab_columns", {})
    except ValueError:  # the client
        return _client_kept


_client_kept: dict = {}


def hold(fabric, name: str, seed: int, dataset_id: int, flats: list[int], how: str) -> int:
    """Views of chunks kept: by ``chunk`` (one get each), ``many`` (get_many) or ``sel``
    (``ds[sel]`` of one chunk's rows).  Returns how many are kept."""
    ds = fabric.dataset(name)
    assert ds.id == dataset_id
    if how == "many":
        views = fabric.get_many([chunk_name(dataset_id, f) for f in flats])
    elif how == "sel":
        views = [ds[f * CHUNK : (f + 1) * CHUNK] for f in flats]
    else:
        views = [ds.chunk(f) for f in flats]
    for f, view in zip(flats, views, strict=True):
        assert not view.flags.owndata, "a zero-copy view"
        kept()[seed, f, how] = view
    return len(kept())


def check_kept() -> list:
    """The kept views whose bytes are not their chunk's."""
    return [key for key, view in kept().items() if not np.array_equal(view, expected(key[0], key[1]))]


def drop_kept(seed: int | None = None) -> None:
    for key in [k for k in kept() if seed is None or k[0] == seed]:
        del kept()[key]


def hold_in(client, fabric, worker, name, seed, dataset_id, flats, how) -> None:
    client.submit(hold, fabric, name, seed, dataset_id, flats, how, workers=[worker], pure=False).result()


def views_intact(client, where: list) -> None:
    for worker in where:
        assert client.submit(check_kept, workers=[worker], pure=False).result() == [], worker
    assert check_kept() == [], "the client's views"


def drop_everywhere(client, where: list, seed: int | None = None) -> None:
    for worker in where:
        client.submit(drop_kept, seed, workers=[worker], pure=False).result()
    drop_kept(seed)


def fill(fabric, prefix: str) -> int:
    """Insert 256 KiB variables of -7 until nothing fits: memory freed under a view is written over."""
    n = 0
    while True:
        try:
            fabric.insert(f"{prefix}/{n}", "", np.float64, np.full(2**15, -7.0))
        except OutOfSpaceError:
            return n
        n += 1


def in_columns_of(dask_scheduler, dataset_id: int) -> int:
    columns = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory.columns.by_dataset.get(dataset_id)
    return 0 if columns is None else columns.left


def slow(dask_scheduler, component: str, method: str, seconds: float) -> None:
    """Runs on the scheduler: ``component.method`` (a coroutine) waits ``seconds`` first;
    0 puts the original back."""
    target = dask_scheduler.plugins[SCHEDULER_PLUGIN]
    for part in component.split("."):
        target = getattr(target, part)
    target.__dict__.pop(method, None)
    if seconds:
        original = getattr(target, method)

        async def slowed(*args, **kwargs):
            await asyncio.sleep(seconds)
            return await original(*args, **kwargs)

        setattr(target, method, slowed)


def blocks_of(dask_scheduler, dataset_id: int) -> list[tuple[str, str]]:
    """Runs on the scheduler: (node, shm_id) of the blocks the dataset's chunks were sealed in."""
    d = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory
    return [(d.blocks[s].node, s) for s in d.columns.by_dataset[dataset_id].shm_ids]


def owners_of(dask_scheduler, dataset_id: int) -> list[str]:
    """Runs on the scheduler: the owners of the blocks the dataset's chunks were sealed in."""
    d = dask_scheduler.plugins[SCHEDULER_PLUGIN].directory
    return sorted({d.blocks[s].worker for s in d.columns.by_dataset[dataset_id].shm_ids})


def write(ds, values) -> str:
    ds[...] = values
    return dask.config.get("datafabric.node-id")
