"""The directory's sorted index of names, and how an allocation is split, as plain
objects (no cluster): a listing read page by page is the whole sorted listing, a prefix
takes exactly the names that start with it, and a node's blocks add up to its share with
one large enough for most of it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datafabric.shm import round_to_pages
from tests.directories import directory, insert
from yp import sizing

ALPHABET = "ab/0é"


def filled(names: list[str]):
    d = directory(("A", "n1", "w1"))
    for i, name in enumerate(names):
        insert(d, name, offset=i * 256)
    return d


@settings(max_examples=60, deadline=None)
@given(
    names=st.sets(st.text(ALPHABET, min_size=1, max_size=5), max_size=40),
    prefix=st.text(ALPHABET, max_size=2),
    limit=st.integers(1, 7),
)
def test_pages_read_one_after_another_are_the_sorted_listing(names, prefix, limit):
    d = filled(sorted(names))
    expected = sorted(n for n in names if n.startswith(prefix))
    assert d.names(prefix) == expected
    pages, after = [], None
    while page := d.names(prefix, limit, after):
        assert len(page) <= limit
        pages += page
        after = page[-1]
    assert pages == expected


@settings(max_examples=60, deadline=None)
@given(names=st.sets(st.text(ALPHABET, min_size=1, max_size=5), max_size=30), after=st.text(ALPHABET, max_size=5))
def test_a_page_starts_after_any_name_listed_or_not(names, after):
    """``after`` need not be a name (the one a page ended with may be deleted since), nor
    under the prefix."""
    d = filled(sorted(names))
    for prefix in ("", "a", "b/"):
        assert d.names(prefix, after=after) == sorted(n for n in names if n.startswith(prefix) and n > after)


def test_a_deleted_name_leaves_the_index_and_a_limit_of_zero_lists_nothing():
    d = filled(["run/1", "run/2", "run0", "rum"])
    d.delete(d.lookup("run/1"))
    assert d.names("run/") == ["run/2"] and d.names("run") == ["run/2", "run0"]
    assert d.names("", 0) == [] and d.names("", 2, after="run/2") == ["run0"]


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("mib", [1, 64, 2048])
def test_a_split_adds_up_to_the_share_and_its_large_block_holds_most_of_it(workers, mib):
    share = mib * 2**20
    names = [f"w{i}" for i in range(workers)]
    held = {w: random.Random(mib).randrange(3) * 2**20 for w in names}
    plan = sizing.split(share, names, held)
    sizes = [size for _, size in plan]
    assert sorted(w for w, _ in plan) == names
    assert share <= sum(sizes) <= round_to_pages(share) + workers * 4096
    assert plan[0][0] == min(names, key=lambda w: (held[w], w))  # the least held takes the large block
    assert sizes[0] >= sizing.big_fraction(workers) * share - workers * 4096  # pages rounded up
    assert sizing.big_fraction(workers) > 0.75


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("nodes", [1, 3])
def test_the_allocate_an_out_of_space_error_advises_holds_the_variable(workers, nodes):
    nbytes = 1536 * 2**20
    mb = sizing.mb_for(nbytes, nodes, workers)
    plan = sizing.split(mb * 2**20 // nodes, [f"w{i}" for i in range(workers)], {})
    assert plan[0][1] >= nbytes + 2**20  # the variable, its header and page alignment


class ListingOnly:
    """A fabric of which ``ls`` uses only ``get_list``, counting its requests."""

    def __init__(self, d) -> None:
        self.d, self.requests = d, 0

    def get_list(self, prefix: str, limit: int | None = None, after: str | None = None) -> list[str]:
        self.requests += 1
        return self.d.names(prefix, limit, after)


def test_ls_reads_the_listing_a_page_a_request():
    from datafabric.cli.read import pages

    names = [f"x/{i:05d}" for i in range(2500)] + ["y/0"]
    fabric = ListingOnly(filled(names))
    assert list(pages(fabric, "x/", 1000)) == names[:2500] and fabric.requests == 3
    fabric.requests = 0
    assert list(pages(fabric, "x/", 500)) == names[:2500] and fabric.requests == 6  # the last page is empty


def test_a_prefix_ending_in_the_last_code_point_is_bounded_right():
    top = chr(0x10FFFF)
    names = ["a", f"a{top}", f"a{top}{top}x", "b", top, f"{top}z"]
    d = filled(sorted(names))
    assert d.names(f"a{top}") == [f"a{top}", f"a{top}{top}x"]
    assert d.names(top) == [top, f"{top}z"] and d.names("a", 2) == ["a", f"a{top}"]
