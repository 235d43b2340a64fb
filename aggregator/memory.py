"""Giving freed memory back to the operating system.

Neither allocator hands back everything it freed by itself. On mimalloc (the
aggregator's, see `aggregator.allocator`) a page that emptied goes back only a
second later, from inside a later malloc or free, which an idle process never
makes. On glibc (with `--allocator pymalloc`) every dict, list and buffer over
512 bytes comes from heaps that keep their free pages until asked. So after
many files arrive (the buffers that carried them are free now) or leave the
index (a big watcher gone, a load over), the aggregator asks: once the index
has grown by `--trim-after-files` since the last trim, or shrunk by as many
from its high-water mark, it runs a full garbage collection, then mimalloc's
`mi_collect` or glibc's `malloc_trim(0)` (in a worker thread: it releases the
GIL), and logs what came back. With neither (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import time
from collections.abc import Callable

import structlog

from aggregator.allocator import mimalloc_collector

log = structlog.get_logger(__name__)


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A function of the C library, or None where it has no such function."""
    libc = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc), name, None) if libc else None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


malloc_trim = _libc_function("malloc_trim", ctypes.c_size_t)
_mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (call before threads start); True if it took.

    glibc gives each thread that allocates (gRPC's pollers, asyncio's workers)
    an arena of its own, up to 8 per core, and each keeps its freed memory and
    its fragmentation apart. Two are plenty for one event loop and a few helper
    threads: at a million files the aggregator holds about 10 % less.
    """
    return _mallopt is not None and arenas > 0 and _mallopt(_M_ARENA_MAX, arenas) == 1


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class MemoryTrimmer:
    """Trims the C heap once the index has grown or shrunk by `threshold` files.

    Growth leaves the buffers that carried the new lists free in the heap;
    shrinking leaves the files' own memory. Owned by the event loop:
    `maybe_trim` is called with the index size from a periodic task (at least
    once a second), and at most one trim runs at a time. After a shrink,
    `release` runs first, on the loop: it lets go of what would pin freed
    memory (see `Store.forget_history`).
    """

    def __init__(self, threshold: int, release: Callable[[], None] = lambda: None) -> None:
        self._threshold = threshold
        self._release = release
        self._mimalloc_collect = mimalloc_collector()
        self._mark = 0  # files at the last trim
        self._high = 0  # most files held since then
        self._baseline = 0  # RSS at start-up

    async def start(self) -> None:
        """Note the RSS at start-up, which each trim's log line compares with.

        This first call also starts the worker thread that trims run in, so its
        objects are allocated with the start-up state, not during the first load.
        """
        self._baseline = await asyncio.to_thread(rss_bytes)

    async def maybe_trim(self, files: int, peak: int = 0) -> bool:
        """Trim if `files` is `threshold` above the last trim or below the high; True if so.

        `peak` is the most files held since the previous call: a big watcher that
        came and went between two calls still counts (see `Store.take_files_peak`).
        """
        self._high = max(self._high, files, peak)
        shrunk = self._high - files >= self._threshold
        can_trim = self._mimalloc_collect is not None or malloc_trim is not None
        if not can_trim or not (shrunk or files - self._mark >= self._threshold):
            if self._mimalloc_collect is not None:
                # mimalloc returns a page a second after it emptied, but only from
                # inside its own calls: this one (well under a millisecond) makes
                # sure an idle aggregator does too.
                self._mimalloc_collect(False)
            return False
        # What the trim answers: the shrink from the high-water mark, or the growth.
        change = files - self._high if shrunk else files - self._mark
        self._mark = self._high = files
        before = await asyncio.to_thread(rss_bytes)
        if shrunk:
            self._release()
        started = time.perf_counter()
        # Cycles (ended calls, tasks, tracebacks) wait for a full collection that a
        # big heap of long-lived objects makes rare; the index itself is not
        # tracked by the collector (bytes and ints), so this is quick.
        gc.collect()
        collect_ms = (time.perf_counter() - started) * 1000
        if self._mimalloc_collect is not None:
            self._mimalloc_collect(True)  # on the loop's thread, whose heap holds what was freed
        elif malloc_trim is not None:
            await asyncio.to_thread(malloc_trim, 0)
        give_back_ms = (time.perf_counter() - started) * 1000 - collect_ms
        after = await asyncio.to_thread(rss_bytes)
        log.info(
            "memory_trimmed",
            files_change=change,
            gc_collect_ms=round(collect_ms, 1),
            give_back_ms=round(give_back_ms, 1),
            allocator="mimalloc" if self._mimalloc_collect is not None else "glibc",
            rss_before_mib=round(before / 2**20, 1),
            rss_after_mib=round(after / 2**20, 1),
            rss_at_start_mib=round(self._baseline / 2**20, 1),
        )
        return True
