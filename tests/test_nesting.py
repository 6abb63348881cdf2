"""A fused chunk read rewritten as one nested call (``yp/nesting.py``): the same value and
the same dependencies as the fused task, on random trees; left as Dask fused it wherever
nesting could change what runs (a result used twice, inner nodes that are not plain tasks)."""

from __future__ import annotations

import operator

from dask._task_spec import DataNode, List, Task, TaskRef
from hypothesis import given, settings
from hypothesis import strategies as st

from yp.nesting import nested

EXTERNAL = ("x", "y")
VALUES = {"x": 3, "y": -5}


def run(task: Task) -> object:
    return task({k: VALUES[k] for k in task.dependencies})


@st.composite
def trees(draw):
    """A random fused task: inner tasks ``t0..tn``, each using its children (results
    used once), external references and constants; ``t0`` the output."""
    count = draw(st.integers(1, 8))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, count)]
    inner = {}
    for i in reversed(range(count)):
        children = [TaskRef(f"t{j}") for j in range(count) if parents[j] == i]
        leaves = draw(st.lists(st.sampled_from([*EXTERNAL, 1, 2, 7]), min_size=max(0, 2 - len(children)), max_size=3))
        args = children + [TaskRef(a) if isinstance(a, str) else a for a in leaves]
        args = draw(st.permutations(args))
        op = draw(st.sampled_from([_sum, _mix]))
        inner[f"t{i}"] = Task(f"t{i}", op, *args)
    return Task.fuse(*inner.values(), key="out")


def _sum(*args):
    return sum(args)


def _mix(*args):
    return args[0] * 2 - sum(args[1:])


@settings(max_examples=200, deadline=None)
@given(trees())
def test_a_fused_tree_runs_nested_to_the_same_value_with_the_same_dependencies(task):
    rewritten = nested(task)
    assert rewritten.key == task.key and rewritten.dependencies == task.dependencies
    assert run(rewritten) == run(task)
    if task.has_subgraph():
        assert not rewritten.has_subgraph()


def fuse(*tasks: Task) -> Task:
    return Task.fuse(*tasks, key="out")


def test_a_result_used_twice_is_left_fused():
    read = Task("read", operator.neg, TaskRef("x"))
    twice_in_one = fuse(read, Task("sum", operator.add, TaskRef("read"), TaskRef("read")))
    assert nested(twice_in_one) is twice_in_one and run(twice_in_one) == -6
    a = Task("a", operator.pos, TaskRef("read"))
    b = Task("b", operator.pos, TaskRef("read"))
    by_two = fuse(read, a, b, Task("sum", operator.add, TaskRef("a"), TaskRef("b")))
    assert nested(by_two) is by_two and run(by_two) == -6


def test_references_inside_containers_are_nested_and_counted():
    read = Task("read", operator.neg, TaskRef("x"))
    in_list = fuse(read, Task("sum", sum, List(TaskRef("read"), TaskRef("y"))))
    assert not nested(in_list).has_subgraph() and run(nested(in_list)) == run(in_list) == -8
    twice = fuse(read, Task("sum", sum, List(TaskRef("read"), TaskRef("read"))))
    assert nested(twice) is twice and run(twice) == -6


def test_inner_nodes_that_are_not_plain_tasks_are_left_fused():
    data = fuse(DataNode("k", 4), Task("sum", operator.add, TaskRef("k"), TaskRef("x")))
    assert nested(data) is data and run(data) == 7


def test_a_task_that_is_not_fused_is_itself():
    plain = Task("out", operator.add, TaskRef("x"), 1)
    assert nested(plain) is plain
