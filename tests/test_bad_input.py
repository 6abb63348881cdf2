"""Bad input, tried systematically: every refusal is a typed FabricError, and none of them
changes the directory or leaks space."""

from __future__ import annotations

import io
import mmap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datafabric import errors
from tests.waiting import wait_for

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

bad_names = st.one_of(
    st.just(""),
    st.text(min_size=256, max_size=400).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) > 255),
    st.text(max_size=20).map(lambda s: s + "\x00"),
    st.text(max_size=20).map(lambda s: "\x1b" + s),
    st.text(max_size=10).map(lambda s: s + "\ud800"),  # lone surrogate: not encodable UTF-8
    st.sampled_from([b"bytes", 1, None, 2.5, ("t",)]),
)

bad_types = st.one_of(
    st.sampled_from(
        [
            "N * float64",
            "var * int8",
            "Any",
            "10 * ?float64",
            "3 * string",
            "float128",
            "{a: int8,",
            "10 * * int8",
            "",
            "1000000000000 * 1000000000000 * float64",
        ]
    ),
    st.text(max_size=30),
    st.sampled_from([None, 3, object(), np.dtype("O"), np.dtype("M8[s]"), np.dtype(">f8")]),
)


def snapshot(fabric):
    return fabric.get_list(), [(b["shm_id"], b["free"], b["reserved"]) for b in fabric.status()]


@pytest.fixture
def seeded(fabric):
    fabric.insert("keep", "a variable that must survive everything", np.float64, np.arange(10.0))
    return fabric


@SETTINGS
@given(name=bad_names)
def test_bad_names_are_refused_everywhere(seeded, name):
    before = snapshot(seeded)
    for call in (
        lambda: seeded.insert(name, "", np.float64, np.ones(2)),
        lambda: seeded.get(name),
        lambda: seeded.info(name),
        lambda: seeded.delete(name),
        lambda: seeded.create(name, "", "2 * float64"),
    ):
        with pytest.raises(errors.InvalidNameError):
            call()
    assert snapshot(seeded) == before


@pytest.mark.parametrize("name", ["../x", "a/../../etc/passwd", "/abs", "..", "dfab_x", "a" * 255])
def test_path_like_names_are_just_keys(seeded, name):
    """Names never reach a filesystem path: these are valid keys, stored and read back."""
    seeded.insert(name, "", np.int8, np.arange(3, dtype=np.int8))
    assert seeded.get(name).tolist() == [0, 1, 2]
    seeded.delete(name)


@SETTINGS
@given(tp=bad_types)
def test_bad_types_are_refused(seeded, tp):
    before = snapshot(seeded)
    try:
        seeded.insert("t", "", tp, np.ones(4))
    except errors.FabricError as exc:
        assert isinstance(exc, errors.InvalidTypeError | errors.TypeMismatchError), exc
    else:  # some random text is a valid type of exactly 32 bytes: then it is stored
        seeded.delete("t")
    assert snapshot(seeded)[0] == before[0]


@SETTINGS
@given(nbytes=st.integers(0, 4096), declared=st.integers(0, 4096))
def test_size_mismatches_are_refused(seeded, nbytes, declared):
    before = snapshot(seeded)
    if nbytes == declared:
        return
    with pytest.raises(errors.TypeMismatchError):
        seeded.insert("m", "", f"{declared} * uint8", b"\x01" * nbytes)
    assert snapshot(seeded) == before


def test_odd_buffers(seeded, tmp_path):
    before = snapshot(seeded)
    strided = np.arange(20.0)[::2]
    seeded.insert("strided", "", "10 * float64", strided)
    np.testing.assert_array_equal(seeded.get("strided"), strided)
    readonly = np.arange(5.0)
    readonly.flags.writeable = False
    seeded.insert("readonly", "", np.float64, readonly)
    seeded.insert("empty", "", "0 * float64", b"")
    assert seeded.get("empty").shape == (0,)
    for name in ("strided", "readonly", "empty"):
        seeded.delete(name)

    path = tmp_path / "data"
    path.write_bytes(b"\x00" * 16)
    f = open(path, "rb")  # noqa: SIM115 - closed on purpose
    f.close()
    cases = [
        (errors.InvalidBufferError, lambda: seeded.insert("x", "", "2 * float64", f)),
        (errors.InvalidBufferError, lambda: seeded.insert("x", "", "2 * float64", io.StringIO("text"))),
        (errors.InvalidBufferError, lambda: seeded.insert("x", "", "2 * float64", [1.0, 2.0])),
        (errors.InvalidBufferError, lambda: seeded.insert("x", "", "2 * float64", None)),
        (errors.TypeMismatchError, lambda: seeded.insert("x", "", np.float64, b"\x00" * 7)),
        (errors.TypeMismatchError, lambda: seeded.insert("x", "", np.int32, np.ones(3))),
        (errors.InvalidArgumentError, lambda: seeded.insert("x", 42, "2 * float64", b"\x00" * 16)),
        (errors.InvalidArgumentError, lambda: seeded.insert("x", "d" * 70000, "2 * float64", b"\x00" * 16)),
    ]
    with open(path, "r+b") as g, mmap.mmap(g.fileno(), 0) as m:
        m.close()
        cases.append((errors.InvalidBufferError, lambda: seeded.insert("x", "", "2 * float64", m)))
        for error, call in cases:
            with pytest.raises(error):
                call()
    with open(path, "rb") as g, pytest.raises(errors.TypeMismatchError):  # a short file, refused before any copy
        seeded.insert("x", "", "3 * float64", g)
    # the variables deleted above were read: their memory goes back when the views'
    # leases end, in the background
    wait_for(lambda: snapshot(seeded) == before, "the background frees of views' leases", 10)
    np.testing.assert_array_equal(seeded.get("keep"), np.arange(10.0))


def test_object_arrays_are_refused_not_stored_as_pointers(seeded):
    before = snapshot(seeded)
    objects = np.array([1, 2, 3], dtype=object)
    with_object_field = np.zeros(3, dtype=[("a", "O"), ("b", "i8")])
    for call in (
        lambda: seeded.insert("o", "", "3 * int64", objects),
        lambda: seeded.insert("o", "", "24 * uint8", memoryview(objects)),
        lambda: seeded.insert("o", "", np.int64, objects),
        lambda: seeded.insert("o", "", "3 * {a : int64, b : int64}", with_object_field),
        lambda: seeded.insert_many([("o", "", "3 * int64", objects)]),
    ):
        with pytest.raises(errors.InvalidTypeError, match="Python objects"):
            call()
    assert snapshot(seeded) == before


def test_bad_arguments_are_refused_before_anything_is_sent(seeded):
    """Each used to escape as a builtin error from a handler, or to be taken quietly."""
    before = snapshot(seeded)
    node, shm_id, offset = seeded.get_locations("keep")[0]
    cases = {
        "num_megabytes": [
            lambda: seeded.allocate(float("nan")),
            lambda: seeded.allocate(float("inf")),
            lambda: seeded.allocate("10"),
            lambda: seeded.allocate(True),
            lambda: seeded.allocate(-1),
        ],
        "prefix": [lambda: seeded.get_list(None), lambda: seeded.get_list(5)],
        "offset": [
            lambda: seeded.get_ptr(node, shm_id, "x"),
            lambda: seeded.get_ptr(node, shm_id, -1),
            lambda: seeded.get_ptr(node, shm_id, True),
            lambda: seeded.get_ptr(node, shm_id, 1.5),
        ],
        "shm_id": [lambda: seeded.get_ptr(node, None, offset), lambda: seeded.deallocate(node, 5)],
        "node": [lambda: seeded.get_ptr(5, shm_id, offset), lambda: seeded.defragment(3)],
        "items": [
            lambda: seeded.insert_many(5),
            lambda: seeded.insert_many([("x", "")]),
            lambda: seeded.insert_many(["abcd"]),
            lambda: seeded.insert_many([("x", "", np.int8, b"\x01"), ("y", "")]),
        ],
        "nodes": [
            lambda: seeded.replicate("keep", -1),
            lambda: seeded.replicate("keep", True),
            lambda: seeded.replicate("keep", node),
            lambda: seeded.replicate("keep", [5]),
        ],
        "cache": [lambda: seeded.get("keep", cache="no")],
        "migrate": [lambda: seeded.deallocate(node, shm_id, migrate="yes")],
        "func": [lambda: seeded.submit(5, "keep")],
    }
    for argument, calls in cases.items():
        for call in calls:
            with pytest.raises(errors.InvalidArgumentError, match=f"^{argument}") as refused:
                call()
            assert " must be " in str(refused.value) and " not " in str(refused.value)
    assert snapshot(seeded) == before


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.text(max_size=3), st.integers()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([object(), np.float64("nan"), np.int64(-3), np.bool_(True), 1j]),
)


def public_calls(fabric, bad, node, shm_id, offset):
    """Every public method with one argument replaced by ``bad``; the others are
    valid, so a call that goes through must have been given a valid ``bad``."""
    return {
        "allocate": lambda: fabric.allocate(bad),
        "deallocate": lambda: fabric.deallocate(bad, shm_id),
        "deallocate-migrate": lambda: fabric.deallocate(node, bad, migrate=True),
        "defragment": lambda: fabric.defragment(bad),
        "insert-name": lambda: fabric.insert(bad, "", np.int8, b"\x01"),
        "insert-doc": lambda: fabric.insert("n", bad, np.int8, b"\x01"),
        "insert-type": lambda: fabric.insert("n", "", bad, b"\x01"),
        "insert-buf": lambda: fabric.insert("n", "", "1 * int8", bad),
        "insert_many": lambda: fabric.insert_many(bad),
        "insert_many-item": lambda: fabric.insert_many([bad]),
        "create-name": lambda: fabric.create(bad, "", "2 * int8"),
        "create-type": lambda: fabric.create("n", "", bad),
        "create-fill": lambda: fabric.create("n", "", "2 * int8", fill=bad),
        "get": lambda: fabric.get(bad),
        "get-cache": lambda: fabric.get("keep", cache=bad),
        "get_ptr-node": lambda: fabric.get_ptr(bad, shm_id, offset),
        "get_ptr-shm_id": lambda: fabric.get_ptr(node, bad, offset),
        "get_ptr-offset": lambda: fabric.get_ptr(node, shm_id, bad),
        "replicate": lambda: fabric.replicate("keep", bad),
        "where": lambda: fabric.where(bad),
        "submit": lambda: fabric.submit(bad, "keep"),
        "get_list": lambda: fabric.get_list(bad),
        "get_locations": lambda: fabric.get_locations(bad),
        "info": lambda: fabric.info(bad),
        "delete": lambda: fabric.delete(bad),
    }


@SETTINGS
@given(bad=anything)
def test_every_public_method_refuses_garbage_with_a_fabric_error(seeded, bad):
    node, shm_id, offset = seeded.get_locations("keep")[0]
    before = snapshot(seeded)
    for method, call in public_calls(seeded, bad, node, shm_id, offset).items():
        try:
            result = call()
        except errors.FabricError:
            continue
        except Exception as exc:
            raise AssertionError(f"{method}({bad!r}) raised {type(exc).__name__}: {exc}") from exc
        # a garbage value that happens to be valid: undo what it did
        if hasattr(result, "close"):
            result.close()
        elif hasattr(result, "abort"):
            result.abort()
        elif method == "allocate":
            for node_, shm in result:
                seeded.deallocate(node_, shm)
        elif method.startswith("insert"):
            for name in set(seeded.get_list()) - set(before[0]):
                seeded.delete(name)
        elif method == "submit":
            result.release()
    assert snapshot(seeded) == before
    np.testing.assert_array_equal(seeded.get("keep"), np.arange(10.0))
