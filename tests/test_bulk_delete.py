"""``delete_many`` and ``delete_prefix``: one request deletes many names, all of them or
none, and a leased variable keeps its bytes until its last view is gone, then its memory
is freed.  A churn of bulk deletes from several processes, each holding views of the
others' variables across their deletes, must only ever read right bytes and leave every
block empty at the end."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from datafabric import errors
from tests import churn
from tests.test_churn import balanced, settles

KiB = 1 << 10


def names_under(prefix: str, n: int, nbytes: int = 4 * KiB) -> list[str]:
    return [f"{prefix}{i}/{nbytes}" for i in range(n)]


def insert_all(fabric, names: list[str]) -> None:
    fabric.insert_many([(n, "", np.uint8, churn.content(n)) for n in names])


def all_free(fabric) -> bool:
    return all(b["free"] == b["capacity"] and b["reserved"] == 0 for b in fabric.status())


def test_delete_many_deletes_all_or_none(fabric):
    names = names_under("many/", 50)
    insert_all(fabric, names)
    with pytest.raises(errors.NameNotFoundError, match="'many/nope'.*nothing was deleted"):
        fabric.delete_many([*names[:10], "many/nope"])
    assert fabric.get_list("many/") == sorted(names)
    assert fabric.delete_many(names[:10] + names[:3]) == 10  # a name twice counts once
    assert fabric.get_list("many/") == sorted(names[10:])
    assert fabric.delete_many(names[10:]) == 40 and fabric.get_list() == []
    assert settles(lambda: all_free(fabric))


def test_delete_prefix_takes_exactly_the_names_under_it(fabric):
    under, beside = names_under("run/a/", 30), names_under("run/ab", 5) + names_under("run/", 2)
    insert_all(fabric, under + beside)
    assert fabric.delete_prefix("run/a/") == 30
    assert fabric.get_list() == sorted(beside)
    assert fabric.delete_prefix("nothing/") == 0
    for name in beside:
        assert churn.differing(name, fabric.get(name)) == 0


@pytest.mark.parametrize(
    "call, said",
    [
        (lambda f: f.delete_many("abc"), "a list, not one str"),
        (lambda f: f.delete_many([""]), "name"),
        (lambda f: f.delete_many(None), "iterable"),
        (lambda f: f.delete_prefix(""), "non-empty prefix"),
        (lambda f: f.delete_prefix(3), "prefix must be a str"),
        (lambda f: f.get_list("", limit=-1), "limit must be an int of 0 or more"),
        (lambda f: f.get_list("", after=1), "after must be a str"),
    ],
)
def test_bad_arguments_are_refused_and_delete_nothing(fabric, call, said):
    insert_all(fabric, ["kept/0/8"])
    with pytest.raises(errors.FabricError, match=said):
        call(fabric)
    assert fabric.get_list() == ["kept/0/8"]


def hold_views(fabric, names: list[str], event_name: str) -> int:
    """Views of ``names`` in this task's process, kept until the event ``<name>/release``
    is set (``<name>/held`` says they are taken); returns how many read wrong while held."""
    from distributed import Event

    views = [fabric.get(n) for n in names]
    Event(f"{event_name}/held").set()
    Event(f"{event_name}/release").wait(60)
    return sum(churn.differing(n, v) for n, v in zip(names, views, strict=True))


def test_a_leased_variable_deleted_in_bulk_keeps_its_bytes_until_released(client, fabric):
    from distributed import Event

    names = names_under("leased/", 40, 64 * KiB)
    insert_all(fabric, names)
    held = client.submit(hold_views, fabric, names[:20], "bulk-lease", pure=False)
    assert Event("bulk-lease/held", client=client).wait(60)
    assert fabric.delete_prefix("leased/") == 40
    assert fabric.get_list() == []
    used = sum(b["used"] for b in fabric.status())
    assert used >= 20 * 64 * KiB, "the held views' memory was freed under them"
    Event("bulk-lease/release", client=client).set()
    assert held.result(timeout=60) == 0, "a view read other bytes after its variable was deleted"
    assert settles(lambda: all_free(fabric)), f"memory still used after the last release: {fabric.status()}"


def bulk_churn(fabric, actor: str, seed: int, seconds: float) -> dict:
    """Insert rounds of names under ``bulk/<actor>/<round>/``, read and hold others' views,
    delete own rounds with ``delete_prefix`` or ``delete_many`` (whole runs of neighbours
    freed at once), and defragment now and then, which moves what the frees left between
    held views; returns counts."""
    rng = random.Random(seed)
    held: list[tuple[str, np.ndarray]] = []
    counts = {"inserted": 0, "deleted": 0, "reads": 0, "bad": 0, "gone": 0, "defragments": 0}
    rounds: list[list[str]] = []
    deadline = time.monotonic() + seconds
    r = 0
    while time.monotonic() < deadline:
        names = [f"bulk/{actor}/{r}/{i}/{rng.choice((64, 4 * KiB, 200 * KiB))}" for i in range(rng.randint(1, 40))]
        try:
            insert_all(fabric, names)
        except errors.OutOfSpaceError:
            names = []
        rounds.append(names)
        counts["inserted"] += len(names)
        r += 1
        for name in fabric.get_list("bulk/", limit=30, after=f"bulk/{rng.random()}")[:8]:
            try:
                view = fabric.get(name)
            except errors.NameNotFoundError:
                counts["gone"] += 1
                continue
            counts["reads"] += 1
            counts["bad"] += churn.differing(name, view) > 0
            held.append((name, view))
        rng.shuffle(held)
        for name, view in held[12:]:
            counts["bad"] += churn.differing(name, view) > 0
        del held[12:]
        if len(rounds) > 2:
            old = rounds.pop(0)
            if rng.random() < 0.5:
                counts["deleted"] += fabric.delete_many(old)
            else:
                counts["deleted"] += fabric.delete_prefix(f"bulk/{actor}/{r - 3}/")
        if rng.random() < 0.1:
            fabric.defragment()
            counts["defragments"] += 1
    for name, view in held:
        counts["bad"] += churn.differing(name, view) > 0
    return counts


@pytest.mark.timeout(180)
def test_churn_of_bulk_deletes_with_views_held_reads_only_right_bytes(client):
    import datafabric

    fabric = datafabric.start(client, mb=128)
    try:
        total = churn.everywhere(client, bulk_churn, fabric, 90, 12)
        print(total)
        assert total["bad"] == 0, f"bad reads: {total}"
        assert total["deleted"] > 200 and total["reads"] > 100 and total["defragments"] > 0, f"too little: {total}"
        assert not balanced(fabric.status())
        listed = fabric.get_list("bulk/")
        assert not churn.verify_listed(fabric) and all(churn.differing(n, fabric.get(n)) == 0 for n in listed)
        assert fabric.delete_prefix("bulk/") == len(listed)
        assert settles(lambda: all_free(fabric), 20), f"memory still used after deleting everything: {fabric.status()}"
    finally:
        fabric.shutdown()
