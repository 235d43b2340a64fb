"""Freed memory goes back to the OS once many files have left (glibc's malloc_trim)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from aggregator.memory import MemoryTrimmer, limit_malloc_arenas, malloc_trim, rss_bytes

needs_glibc = pytest.mark.skipif(malloc_trim is None, reason="no malloc_trim in this C library")


@needs_glibc
async def test_trims_once_the_index_grew_or_shrank_by_the_threshold() -> None:
    released = []
    trimmer = MemoryTrimmer(threshold=1000, release=lambda: released.append(True))
    assert not await trimmer.maybe_trim(500)
    assert await trimmer.maybe_trim(1000)  # grew by 1000 since the start
    assert not released  # what pins freed memory is let go only after a shrink
    assert not await trimmer.maybe_trim(1500)  # the high-water mark
    assert not await trimmer.maybe_trim(600)  # down 900
    assert await trimmer.maybe_trim(500)  # down 1000 from it
    assert released == [True]
    assert not await trimmer.maybe_trim(1400)  # up 900 from the last trim
    assert await trimmer.maybe_trim(1500)
    assert released == [True]


@needs_glibc
async def test_a_trim_hands_freed_heap_pages_back() -> None:
    # 64 MiB in 2 KiB buffers (from malloc, not CPython's arenas), pinned by one
    # later allocation so that glibc cannot simply shrink its heap from the top.
    blocks = [bytearray(2048) for _ in range(32 * 1024)]
    pin = bytearray(2048)
    before_free = rss_bytes()
    del blocks
    trimmer = MemoryTrimmer(threshold=1)
    await trimmer.maybe_trim(1)
    assert await trimmer.maybe_trim(0)
    assert rss_bytes() < before_free - 32 * 2**20
    del pin


@needs_glibc
def test_malloc_arenas_can_be_capped() -> None:
    assert limit_malloc_arenas(8)  # glibc's own cap on a small machine: harmless here
    assert not limit_malloc_arenas(0)


@needs_glibc
async def test_a_peak_between_two_calls_still_counts_as_a_shrink() -> None:
    trimmer = MemoryTrimmer(threshold=1000)
    assert not await trimmer.maybe_trim(0)
    # 5,000 files came and went between two calls: only the peak tells.
    with capture_logs() as logs:
        assert await trimmer.maybe_trim(0, peak=5000)
    [trimmed] = [e for e in logs if e["event"] == "memory_trimmed"]
    assert trimmed["files_change"] == -5000  # the shrink, though none were seen arrive
    assert not await trimmer.maybe_trim(0, peak=900)
