"""A sorted container split into pages, each stamped with a serial that changes when it does.

The same idea as `sortedcontainers.SortedList` (a list of sorted sublists with
a list of their maxima for bisection), plus one thing it does not offer: every
page carries a serial number, new on each mutation of that page. Readers can
cache work per page (for example the JSON encoding of its entries) and redo
only the pages whose serial changed, so one change in a million entries costs
one page of work, not a million.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, Self, TypeVar


class _Comparable(Protocol):
    def __lt__(self, other: Self, /) -> bool: ...


K = TypeVar("K", bound=_Comparable)

_serials = itertools.count(1)


class Page(Generic[K]):
    """A sorted run of keys and its serial (new whenever the run changes)."""

    __slots__ = ("keys", "serial")

    def __init__(self, keys: list[K]) -> None:
        self.keys = keys
        self.serial = next(_serials)


class SortedPages(Generic[K]):
    """Unique keys in order, in pages of `load` to `2 * load` keys.

    Insert and remove cost O(log n + load); iteration is in order.
    """

    def __init__(self, load: int = 1000) -> None:
        self._load = load
        self._pages: list[Page[K]] = []
        self._maxes: list[K] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        for page in self._pages:
            yield from page.keys

    def pages(self) -> list[Page[K]]:
        """The pages, in order. Read-only, and valid until the next mutation."""
        return self._pages

    def add(self, key: K) -> None:
        """Insert a key that is not present."""
        if not self._pages:
            self._pages.append(Page([key]))
            self._maxes.append(key)
            self._len = 1
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._pages):
            i -= 1
        page = self._pages[i]
        insort(page.keys, key)
        page.serial = next(_serials)
        self._maxes[i] = page.keys[-1]
        self._len += 1
        if len(page.keys) > 2 * self._load:
            half = len(page.keys) // 2
            right = Page(page.keys[half:])
            page.keys = page.keys[:half]
            page.serial = next(_serials)
            self._pages.insert(i + 1, right)
            self._maxes[i] = page.keys[-1]
            self._maxes.insert(i + 1, right.keys[-1])

    def remove(self, key: K) -> None:
        """Remove a key that is present (KeyError otherwise)."""
        i = bisect_left(self._maxes, key)
        if i == len(self._pages):
            raise KeyError(key)
        page = self._pages[i]
        j = bisect_left(page.keys, key)
        if j == len(page.keys) or page.keys[j] != key:
            raise KeyError(key)
        del page.keys[j]
        self._len -= 1
        if not page.keys:
            del self._pages[i]
            del self._maxes[i]
            return
        page.serial = next(_serials)
        self._maxes[i] = page.keys[-1]

    def touch(self, key: K) -> None:
        """Re-stamp the page holding `key` (present): its value changed, not its keys."""
        i = bisect_left(self._maxes, key)
        if i == len(self._pages):
            raise KeyError(key)
        self._pages[i].serial = next(_serials)

    def rebuild(self, keys: Iterable[K]) -> None:
        """Replace the content with `keys`, which must be sorted and unique (bulk load).

        A list is sliced into the pages, not copied first: at a million keys, a
        copy is 8 MB that the C allocator keeps once freed, under the pages.
        """
        ordered = keys if isinstance(keys, list) else list(keys)
        load = self._load
        self._pages = [Page(ordered[i : i + load]) for i in range(0, len(ordered), load)]
        self._maxes = [page.keys[-1] for page in self._pages]
        self._len = len(ordered)

    def after(self, key: K | None) -> Iterator[K]:
        """Keys strictly greater than `key` (all keys if None), in order."""
        if key is None:
            yield from self
            return
        i = bisect_right(self._maxes, key)
        if i == len(self._pages):
            return
        page = self._pages[i]
        yield from page.keys[bisect_right(page.keys, key) :]
        for page in self._pages[i + 1 :]:
            yield from page.keys
