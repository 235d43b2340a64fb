"""SortedPages: order, uniqueness, paging, and serials that change exactly with their page."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.pages import SortedPages


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=400), st.integers(1, 8))
def test_matches_a_sorted_set(ops: list[tuple[bool, int]], load: int) -> None:
    pages: SortedPages[int] = SortedPages(load=load)
    model: set[int] = set()
    for add, key in ops:
        if add and key not in model:
            pages.add(key)
            model.add(key)
        elif not add and key in model:
            pages.remove(key)
            model.discard(key)
    assert list(pages) == sorted(model)
    assert len(pages) == len(model)
    for page in pages.pages():
        assert 0 < len(page.keys) <= 2 * load
    for probe in (-1, 0, 150, 300, 301):
        assert list(pages.after(probe)) == [k for k in sorted(model) if k > probe]
    assert list(pages.after(None)) == sorted(model)


def test_only_the_touched_page_gets_a_new_serial() -> None:
    pages: SortedPages[int] = SortedPages(load=10)
    pages.rebuild(range(0, 100, 2))
    before = [(p.serial, list(p.keys)) for p in pages.pages()]
    pages.add(25)
    after = [(p.serial, list(p.keys)) for p in pages.pages()]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == 1
    assert 25 in after[changed[0]][1]
    assert after[changed[0]][0] != before[changed[0]][0]


def test_removing_an_absent_key_raises() -> None:
    pages: SortedPages[int] = SortedPages()
    pages.add(1)
    for missing in (0, 2):
        with pytest.raises(KeyError):
            pages.remove(missing)
    assert list(pages) == [1]
