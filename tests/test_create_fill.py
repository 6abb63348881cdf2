"""``create`` hands out memory that reads as a fill value, never a deleted variable's
bytes, and refuses a name that exists before any filling, as h5py's create_dataset does."""

from __future__ import annotations

import numpy as np
import pytest

from datafabric import errors

N = 2**19  # 4 MiB of float64


def recycle(fabric, value: float = 42.0, count: int = 6) -> None:
    """Fill the blocks with ``value`` and free it again: the next reservations land on
    memory that held it."""
    for i in range(count):
        fabric.insert(f"old{i}", "", np.float64, np.full(N, value))
    for i in range(count):
        fabric.delete(f"old{i}")


def test_create_after_a_delete_reads_zero_not_the_old_bytes(fabric):
    recycle(fabric)
    with fabric.create("new", "", f"{N} * float64") as out:
        assert np.unique(out).tolist() == [0.0]
        out[: N // 2] = 1.0
    got = fabric.get("new")
    assert np.unique(got[: N // 2]).tolist() == [1.0]
    assert np.unique(got[N // 2 :]).tolist() == [0.0]  # never written: the fill, after the seal too


def test_fill_values(fabric):
    recycle(fabric, count=2)
    with fabric.create("nan", "", "1000 * float64", fill=float("nan")) as out:
        assert np.isnan(out).all()
    with fabric.create("seven", "", "10 * 20 * int32", fill=7) as out:
        assert (out == 7).all() and out.shape == (10, 20)
    with fabric.create("records", "", "5 * {a : int8, b : float64}", fill=(3, 2.5)) as out:
        assert out["a"].tolist() == [3] * 5 and out["b"].tolist() == [2.5] * 5
    with fabric.create("text", "", "4 * fixed_string(3, 'ascii')") as out:
        assert out.tolist() == [b""] * 4  # the default fill is zero bytes, whatever the type
    with fabric.create("raw", "", f"{N} * float64", fill=None) as out:
        out[:] = 5.0  # a producer that writes every byte asks for no fill
    assert fabric.get("raw")[-1] == 5.0
    for name in ("nan", "seven", "records", "text", "raw"):
        fabric.delete(name)


@pytest.mark.parametrize(
    "tp, fill",
    [("4 * int32", 1.5), ("4 * int32", float("nan")), ("4 * int8", 300), ("4 * float64", "abc"), ("4 * int8", [1, 2])],
)
def test_a_fill_the_type_cannot_hold_is_refused_before_anything_is_reserved(fabric, tp, fill):
    before = [(b["shm_id"], b["free"], b["reserved"]) for b in fabric.status()]
    with pytest.raises(errors.InvalidArgumentError, match="^fill must be"):
        fabric.create("f", "", tp, fill=fill)
    assert [(b["shm_id"], b["free"], b["reserved"]) for b in fabric.status()] == before
    assert fabric.get_list() == []


def test_create_of_an_existing_name_is_refused_on_entry(fabric):
    fabric.insert("taken", "", np.int8, np.arange(3, dtype=np.int8))
    before = [(b["shm_id"], b["free"], b["reserved"]) for b in fabric.status()]
    entered = False
    with pytest.raises(errors.NameExistsError, match="taken"), fabric.create("taken", "", "1000 * float64"):
        entered = True  # h5py's create_dataset refuses at once: the producer never runs
    assert not entered
    assert [(b["shm_id"], b["free"], b["reserved"]) for b in fabric.status()] == before
    assert fabric.get("taken").tolist() == [0, 1, 2]


def test_two_creators_of_one_name_race_to_the_seal(fabric):
    first = fabric.create("race", "", "3 * int8", fill=1)
    second = fabric.create("race", "", "3 * int8", fill=2)
    first.seal()
    with pytest.raises(errors.NameExistsError):
        second.seal()
    assert fabric.get("race").tolist() == [1, 1, 1]
    assert all(b["reserved"] == 0 for b in fabric.status())
