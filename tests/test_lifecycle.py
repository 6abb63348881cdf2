"""Memory lifecycle on a real cluster: create+seal, defragment, deallocate with migration,
a stateful property test against a model, and concurrent users."""

from __future__ import annotations

import hashlib
import sys
import time

import cloudpickle
import numpy as np
import pytest
from distributed import get_worker
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from datafabric import errors, layout
from datafabric.shm import Segment
from tests.conftest import fabric_segments
from tests.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20


def workers(client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def pattern(name: str, nbytes: int) -> np.ndarray:
    """Bytes determined by the name, so any reader can check what it sees."""
    seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def insert_pattern(fabric, name, nbytes):
    return fabric.insert(name, "", np.uint8, pattern(name, nbytes))


def block_walk(shm_id: str) -> list[tuple[int, int, int]]:
    seg = Segment.attach(shm_id)
    try:
        return [(e.offset, e.size, int(e.state)) for e in layout.walk(seg.buf)]
    finally:
        seg.close()


def allocator_view(client, worker: str, shm_id: str) -> list[tuple[int, int, int]]:
    rows = client.sync(client.rpc(worker).datafabric_block_extents, shm_id=shm_id)
    return [tuple(r) for r in rows]


def total_free(fabric) -> int:
    return sum(b["free"] for b in fabric.status())


# -- create + seal --------------------------------------------------------------------
def test_create_fills_in_place_and_seals(client, fabric, tmp_path):
    a = np.arange(1000.0)
    with fabric.create("sum", "a + a", "1000 * float64") as out:
        assert out.flags.writeable
        np.add(a, a, out=out)
        assert "sum" not in fabric.get_list()  # invisible until sealed
    assert not out.flags.writeable
    np.testing.assert_array_equal(fabric.get("sum"), 2 * a)

    path = tmp_path / "raw"
    path.write_bytes(np.arange(64, dtype=np.int32).tobytes())
    creation = fabric.create("from-file", "read in place", "8 * 8 * int32")
    with open(path, "rb") as f:
        assert f.readinto(creation.array) == 256
    locations = creation.seal()
    assert fabric.get_locations("from-file") == locations
    np.testing.assert_array_equal(fabric.get("from-file").ravel(), np.arange(64))


def test_create_failures_leave_nothing(client, fabric):
    free = total_free(fabric)
    with pytest.raises(RuntimeError), fabric.create("boom", "", "100 * float64") as out:
        out[:] = 1
        raise RuntimeError("producer failed")
    dropped = fabric.create("dropped", "", "100 * float64")
    del dropped  # never sealed
    fabric.insert("taken", "", np.float64, np.ones(3))
    with pytest.raises(errors.NameExistsError), fabric.create("taken", "", "3 * float64") as out:
        out[:] = 2
    with pytest.raises(errors.InvalidTypeError):
        fabric.create("x", "", np.float64)
    assert fabric.get_list() == ["taken"]
    np.testing.assert_array_equal(fabric.get("taken"), np.ones(3))
    taken = fabric.info("taken")["nbytes"]
    wait_for(
        lambda: (
            total_free(fabric)
            == free - layout.extent_size_for(layout.BLOCK_HEADER_SIZE, "taken", "3 * float64", "", taken)
        )
    )
    assert all(b["reserved"] == 0 for b in fabric.status())


def test_create_in_a_task_that_fails_reclaims_its_reservation(client, fabric):
    a, _ = workers(client)

    def produce(fabric):
        with fabric.create("half", "", "10 * float64") as out:
            out[:5] = 1
            raise ValueError("half written")

    free = total_free(fabric)
    with pytest.raises(ValueError, match="half written"):
        client.submit(produce, fabric, workers=[a]).result()
    assert fabric.get_list() == [] and total_free(fabric) == free


# -- defragment -----------------------------------------------------------------------
def filling(fabric, worker: str, nbytes: int) -> int:
    """How many variables of ``nbytes`` (page-aligned data, a page of header each) fill
    ``worker``'s largest block: the blocks of one allocate are unequal (``yp/sizing.py``)."""
    capacity = max(s["capacity"] for s in fabric.status() if s["worker"] == worker)
    return capacity // (nbytes + 4096)


def test_defragment_moves_unleased_variables_and_keeps_held_views(client, fabric):
    a, _ = workers(client)
    n = filling(fabric, a, 2 * MiB)
    names = [f"d{i:02}" for i in range(n)]  # worker A's block, less than 2 MiB left free
    last = names[-1]
    for name in names:
        client.submit(insert_pattern, fabric, name, 2 * MiB, workers=[a]).result()
    held = fabric.get(last)  # leased: must not move
    before = {name: fabric.get_locations(name) for name in names}
    for name in names[0 : n - 1 : 2]:
        fabric.delete(name)
    kept = names[1 : n - 1 : 2]

    report = fabric.defragment()
    assert report["moved"] == kept
    [block] = [b for b in report["blocks"] if b["moved"]]
    freed = (n // 2) * 2 * MiB  # the deleted ones, in pieces of one variable each
    assert block["largest_free_before"] < 5 * MiB < freed < block["largest_free_after"]
    assert block["bytes_moved"] >= len(kept) * 2 * MiB
    assert fabric.get_locations(last) == before[last]
    assert all(fabric.get_locations(name) != before[name] for name in kept)
    for name in [*kept, last]:
        np.testing.assert_array_equal(fabric.get(name), pattern(name, 2 * MiB))
    np.testing.assert_array_equal(held, pattern(last, 2 * MiB))
    shm_id = before["d01"][0][1]
    assert block_walk(shm_id) == allocator_view(client, a, shm_id)


def test_insert_defragments_once_when_free_space_is_in_pieces(client):
    import datafabric

    fabric = datafabric.start(client, mb=32)
    try:
        a, _ = workers(client)
        n = filling(fabric, a, 2 * MiB)  # A's block, the node's large one
        for i in range(n):
            client.submit(insert_pattern, fabric, f"p{i}", 2 * MiB, workers=[a]).result()
        for i in range(0, n - 1, 2):  # the last stays: no deleted one joins the free tail
            fabric.delete(f"p{i}")
        # A's block has about half its space free, in pieces of 2 MiB; the other block is smaller
        assert max(s["largest_free"] for s in fabric.status()) < 6 * MiB
        fabric.insert("big", "", np.uint8, pattern("big", 6 * MiB))
        np.testing.assert_array_equal(fabric.get("big"), pattern("big", 6 * MiB))
        for i in range(1, n, 2):
            np.testing.assert_array_equal(fabric.get(f"p{i}"), pattern(f"p{i}", 2 * MiB))
    finally:
        fabric.shutdown()


# -- deallocate -------------------------------------------------------------------------
def test_deallocate_with_migrate_moves_variables_to_the_node_s_other_blocks(client, fabric):
    a, _ = workers(client)
    [(node, shm_id, _)] = client.submit(insert_pattern, fabric, "mover", MiB, workers=[a]).result()
    held = fabric.get("mover")
    with pytest.raises(errors.BlockInUseError):
        fabric.deallocate(node, shm_id)
    fabric.deallocate(node, shm_id, migrate=True)
    assert shm_id not in fabric_segments()
    [(new_node, new_shm, _)] = fabric.get_locations("mover")
    assert new_node == node and new_shm != shm_id
    np.testing.assert_array_equal(fabric.get("mover"), pattern("mover", MiB))
    np.testing.assert_array_equal(held, pattern("mover", MiB))  # old pages live on while viewed


# -- a model-checked sequence of operations ---------------------------------------------
def task_views() -> dict:
    """Views a task took and left alive in its worker, with the bytes they showed."""
    return get_worker().__dict__.setdefault("_dfab_model_views", {})


def hold_in_task(fabric, name: str, key: int) -> None:
    view = fabric.get(name)  # leased in the worker's process, locally once the name is published
    task_views()[key] = (view, view.copy())


def hold_many_in_task(fabric, names: list[str], first_key: int) -> None:
    """One get_many (a batch of local leases, a name maybe twice), each view kept apart."""
    for key, view in enumerate(fabric.get_many(names), first_key):
        task_views()[key] = (view, view.copy())


def drop_in_task(key: int) -> None:
    task_views().pop(key)


def drop_all_in_worker(dask_worker) -> None:
    dask_worker.__dict__.pop("_dfab_model_views", None)


def changed_in_task() -> list[int]:
    return [key for key, (view, seen) in task_views().items() if not np.array_equal(view, seen)]


class FabricMachine(RuleBasedStateMachine):
    """Random sequences of insert / create+seal / get-and-hold (in the client and in
    tasks, whose gets lease locally) / release / delete / defragment on a real fabric,
    checked against a dict of what should be there."""

    client = None
    fabric = None

    def __init__(self):
        super().__init__()
        self.model: dict[str, int] = {}  # visible name -> size
        self.held: list[tuple[str, np.ndarray, np.ndarray]] = []  # name, view, bytes it showed
        self.task_held: list[tuple[str, int]] = []  # (worker, key) of views tasks keep
        self.counter = 0

    @initialize()
    def empty(self):
        for name in self.fabric.get_list():
            self.fabric.delete(name)

    def new_name(self) -> str:
        self.counter += 1
        return f"m/{self.counter}"

    @rule(nbytes=st.integers(0, 3 * MiB))
    def insert(self, nbytes):
        name = self.new_name()
        try:
            self.fabric.insert(name, "", np.uint8, pattern(name, nbytes))
        except errors.OutOfSpaceError:
            assert sum(self.model.values()) + nbytes > 16 * MiB  # refused only when really tight
            return
        self.model[name] = nbytes

    @rule(nbytes=st.integers(1, 2 * MiB))
    def create_and_seal(self, nbytes):
        name = self.new_name()
        try:
            with self.fabric.create(name, "made in place", f"{nbytes} * uint8") as out:
                out[:] = pattern(name, nbytes)
        except errors.OutOfSpaceError:
            return
        self.model[name] = nbytes

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get_and_hold(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)))
        view = self.fabric.get(name)
        self.held.append((name, view, view.copy()))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get_and_hold_in_a_task(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)))
        worker = data.draw(st.sampled_from(workers(self.client)))
        self.counter += 1
        self.client.submit(hold_in_task, self.fabric, name, self.counter, workers=[worker], pure=False).result()
        self.task_held.append((worker, self.counter))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get_many_and_hold_in_a_task(self, data):
        names = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=6))
        worker = data.draw(st.sampled_from(workers(self.client)))
        first, self.counter = self.counter + 1, self.counter + len(names)
        self.client.submit(hold_many_in_task, self.fabric, names, first, workers=[worker], pure=False).result()
        self.task_held += [(worker, key) for key in range(first, self.counter + 1)]

    @precondition(lambda self: self.task_held)
    @rule(data=st.data())
    def release_in_a_task(self, data):
        worker, key = self.task_held.pop(data.draw(st.integers(0, len(self.task_held) - 1)))
        self.client.submit(drop_in_task, key, workers=[worker], pure=False).result()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.fabric.delete(name)
        del self.model[name]

    @rule()
    def defragment(self):
        self.fabric.defragment()

    @invariant()
    def visible_variables_read_back_exactly(self):
        assert self.fabric.get_list(prefix="m/") == sorted(self.model)
        for name, nbytes in self.model.items():
            view = self.fabric.get(name)
            assert view.nbytes == nbytes and np.array_equal(view, pattern(name, nbytes))

    @invariant()
    def held_views_never_change(self):
        for _, view, seen in self.held:
            assert np.array_equal(view, seen)
        for worker in {w for w, _ in self.task_held}:
            assert self.client.submit(changed_in_task, workers=[worker], pure=False).result() == []

    @invariant()
    def blocks_add_up_and_agree_with_their_headers(self):
        """Frees after a lease ends are asynchronous: the three views of a block (its
        headers, its allocator, the stats) must agree once they have settled."""

        def settled() -> bool:
            for block in self.fabric.status():
                assert block["free"] + block["used"] == block["capacity"]
                walk = block_walk(block["shm_id"])
                free = sum(size for _, size, state in walk if state == layout.ExtentState.FREE)
                if walk != allocator_view(self.client, block["worker"], block["shm_id"]) or free != block["free"]:
                    return False
            return True

        wait_for(settled)

    def teardown(self):
        self.held.clear()
        self.client.run(drop_all_in_worker)


def test_random_operation_sequences_against_a_model(client, fabric):
    FabricMachine.client, FabricMachine.fabric = client, fabric
    test = FabricMachine.TestCase
    test.settings = settings(
        max_examples=12,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    test("runTest").runTest()


# -- concurrency ------------------------------------------------------------------------
def churn(fabric, worker_tag: str, seconds: float, seed: int) -> dict:
    """One user: insert, read and check, hold views, delete; for a bounded time."""
    rng = np.random.default_rng(seed)
    mine: list[str] = []
    held: list[tuple[np.ndarray, np.ndarray]] = []
    counts = {"inserts": 0, "reads": 0, "deletes": 0, "full": 0}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        op = rng.integers(0, 4)
        if op == 0 or not mine:
            name = f"c/{worker_tag}/{i}"
            i += 1
            nbytes = int(rng.integers(1, 512 * 1024))
            try:
                fabric.insert(name, "", np.uint8, pattern(name, nbytes))
            except errors.OutOfSpaceError:
                counts["full"] += 1
                continue
            mine.append(name)
            counts["inserts"] += 1
        elif op == 1:
            name = mine[int(rng.integers(len(mine)))]
            view = fabric.get(name)
            if not np.array_equal(view, pattern(name, view.nbytes)):
                raise AssertionError(f"{name} read wrong bytes")
            if rng.random() < 0.3:
                held.append((view, view.copy()))
            counts["reads"] += 1
        elif op == 2 and held:
            view, seen = held.pop(int(rng.integers(len(held))))
            if not np.array_equal(view, seen):
                raise AssertionError("a held view changed")
        else:
            fabric.delete(mine.pop(int(rng.integers(len(mine)))))
            counts["deletes"] += 1
    for view, seen in held:
        if not np.array_equal(view, seen):
            raise AssertionError("a held view changed")
    for name in mine:
        fabric.delete(name)
    return counts


def test_concurrent_users_and_defragment_see_right_bytes_and_free_everything(client, fabric):
    free = total_free(fabric)
    a, b = workers(client)
    futures = [
        client.submit(churn, fabric, f"{w[-5:]}-{k}", 4.0, k, workers=[w], pure=False)
        for k, w in enumerate([a, a, b, b])
    ]
    deadline = time.monotonic() + 4.0
    defrags = 0
    while time.monotonic() < deadline:
        fabric.defragment()
        defrags += 1
    results = client.gather(futures)
    assert sum(r["inserts"] for r in results) > 50 and sum(r["reads"] for r in results) > 50
    assert defrags > 3
    assert fabric.get_list() == []
    wait_for(lambda: total_free(fabric) == free)
