"""Both observers on a real folder: what reaches the sink, and how they end.

Each test runs with `inotify` (read in the event loop) and `watchdog` (its
thread); the sink records every observation as the folder watch would get it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import wait_for_async
from watcher.observers import Observation, Observer, make_observer
from watcher.scanner import FileStat

TIMEOUT = 5.0


class Recorder:
    """The sink: every observation, in order, and whether an overflow was reported."""

    def __init__(self) -> None:
        self.seen: list[Observation] = []
        self.overflows = 0

    def sink(self, obs: Observation, observed_ns: int) -> None:
        assert observed_ns > 0
        self.seen.append(obs)

    def overflowed(self) -> None:
        self.overflows += 1

    def last_state(self) -> dict[bytes, FileStat | None]:
        """Each name's latest reported state."""
        state: dict[bytes, FileStat | None] = {}
        for obs in self.seen:
            state.update(obs)
        return state


@pytest.fixture(params=["inotify", "watchdog"])
async def watched(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Path, Observer, Recorder]]:
    folder = tmp_path / "w"
    folder.mkdir()
    rec = Recorder()
    observer = make_observer(
        str(request.param),
        os.fsencode(folder),
        asyncio.get_running_loop(),
        rec.sink,
        rec.overflowed,
    )
    observer.start()
    try:
        yield folder, observer, rec
    finally:
        await observer.stop()


async def _until_state(rec: Recorder, name: bytes, check: object, what: str) -> None:
    async def probe() -> bool:
        return rec.last_state().get(name, "unseen") == check

    await wait_for_async(probe, TIMEOUT, what=what)


async def test_create_modify_delete_reach_the_sink_with_the_current_stat(
    watched: tuple[Path, Observer, Recorder],
) -> None:
    folder, _, rec = watched
    (folder / "a.txt").write_bytes(b"12345")
    st = os.stat(folder / "a.txt")
    await _until_state(rec, b"a.txt", (5, st.st_mtime_ns), "the new file, with its size")
    (folder / "a.txt").write_bytes(b"1234567")
    st = os.stat(folder / "a.txt")
    await _until_state(rec, b"a.txt", (7, st.st_mtime_ns), "the new size")
    os.utime(folder / "a.txt", ns=(0, 86_400 * 10**9))
    await _until_state(rec, b"a.txt", (7, 86_400 * 10**9), "a new time set on the file")
    (folder / "a.txt").unlink()
    await _until_state(rec, b"a.txt", None, "the file gone")


async def test_a_rename_inside_the_folder_is_one_observation_of_both_names(
    watched: tuple[Path, Observer, Recorder],
) -> None:
    folder, _, rec = watched
    (folder / "old.txt").write_bytes(b"x")
    await _until_state(rec, b"old.txt", (1, os.stat(folder / "old.txt").st_mtime_ns), "created")
    before = len(rec.seen)
    (folder / "old.txt").rename(folder / "new.txt")
    await _until_state(rec, b"new.txt", (1, os.stat(folder / "new.txt").st_mtime_ns), "renamed")
    both = [obs for obs in rec.seen[before:] if {n for n, _ in obs} >= {b"old.txt", b"new.txt"}]
    assert both, f"the two names came apart: {rec.seen[before:]!r}"
    assert dict(both[0])[b"old.txt"] is None


async def test_subfolders_and_their_contents_are_no_files(
    watched: tuple[Path, Observer, Recorder],
) -> None:
    folder, _, rec = watched
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_bytes(b"x")
    (folder / "marker.txt").write_bytes(b"x")
    await _until_state(rec, b"marker.txt", (1, os.stat(folder / "marker.txt").st_mtime_ns), "m")
    state = rec.last_state()
    assert state.get(b"sub") is None
    assert b"deep.txt" not in state and b"sub/deep.txt" not in state


async def test_the_inotify_observer_ends_when_its_folder_is_moved_away(
    watched: tuple[Path, Observer, Recorder], request: pytest.FixtureRequest
) -> None:
    """Its events would be of another folder now: it ends, and the supervisor takes over.

    (A deleted folder stays pinned by the observer's own descriptor until the
    supervisor, which checks the folder's identity, stops it.)
    """
    folder, observer, rec = watched
    if "watchdog" in request.node.callspec.id:
        pytest.skip("watchdog's thread outlives its folder; the supervisor checks the identity")
    assert observer.is_alive()
    folder.rename(folder.with_name("elsewhere"))

    async def alive() -> bool:
        return observer.is_alive()

    await wait_for_async(alive, TIMEOUT, until=lambda a: not a, what="the observer to end")
    seen = len(rec.seen)
    (folder.with_name("elsewhere") / "late.txt").write_bytes(b"x")
    await observer.stop()  # a second stop is harmless
    await asyncio.sleep(0)  # a callback already queued would run here
    assert len(rec.seen) == seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
async def test_inotify_reads_what_comes_within_the_read_interval_together(tmp_path: Path) -> None:
    """A change after a quiet spell is read at once; those right behind it, in one read."""
    folder = tmp_path / "w"
    folder.mkdir()
    rec = Recorder()
    observer = make_observer(
        "inotify",
        os.fsencode(folder),
        asyncio.get_running_loop(),
        rec.sink,
        rec.overflowed,
        read_interval=1.0,  # far longer than the burst below takes
    )
    observer.start()
    try:
        os.close(os.open(folder / "first.txt", os.O_WRONLY | os.O_CREAT))  # one event
        await _until_state(rec, b"first.txt", (0, os.stat(folder / "first.txt").st_mtime_ns), "1")
        assert len(rec.seen) == 1
        names = [f"burst-{i:02d}".encode() for i in range(30)]
        for name in names:
            (folder / os.fsdecode(name)).write_bytes(b"yy")
            await asyncio.sleep(0.001)  # the loop could read each: a source of events, no wait
        await _until_state(rec, names[-1], (2, os.stat(folder / "burst-29").st_mtime_ns), "burst")
        assert len(rec.seen) == 2, [sorted(n for n, _ in obs) for obs in rec.seen]
        assert sorted(n for n, _ in rec.seen[1]) == names
        assert rec.overflows == 0
    finally:
        await observer.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
async def test_inotify_reads_further_apart_while_changes_keep_coming(tmp_path: Path) -> None:
    """Each read that finds changes waiting doubles the wait before the next, up to the
    most; once a read finds none, the next change is read as soon as it comes."""
    folder = tmp_path / "w"
    folder.mkdir()
    loop = asyncio.get_running_loop()
    rec = Recorder()
    reads: list[float] = []

    def sink(obs: Observation, observed_ns: int) -> None:
        reads.append(loop.time())
        rec.sink(obs, observed_ns)

    least, most = 0.02, 0.16
    observer = make_observer(
        "inotify",
        os.fsencode(folder),
        loop,
        sink,
        rec.overflowed,
        read_interval=least,
        read_interval_max=most,
    )
    observer.start()
    try:
        # A change every 5 ms for 0.6 s: every wait ends with changes queued.
        end, i = loop.time() + 0.6, 0
        while loop.time() < end:
            (folder / f"churn-{i:03d}").write_bytes(b"x")
            i += 1
            await asyncio.sleep(0.005)
        last = f"churn-{i - 1:03d}"
        await _until_state(rec, last.encode(), (1, os.stat(folder / last).st_mtime_ns), "churn")
        gaps = [b - a for a, b in itertools.pairwise(reads)]
        waits = [min(least * 2**k, most) for k in range(len(gaps))]
        assert len(gaps) >= 3, reads
        # A timer never fires early; a busy loop only makes the gaps longer.
        assert all(gap >= wait - 0.001 for gap, wait in zip(gaps, waits, strict=True)), (
            gaps,
            waits,
        )
        assert len(reads) < i / 2  # at a fixed 20 ms, 0.6 s of changes would take 30 reads

        # A quiet spell longer than the longest wait: the next read finds nothing.
        await asyncio.sleep(2 * most)
        seen = len(rec.seen)
        os.close(os.open(folder / "lone.txt", os.O_WRONLY | os.O_CREAT))  # queued at once
        for _ in range(3):  # a few turns of the loop, no timer: only the reader can see it
            await asyncio.sleep(0)
        assert [n for obs in rec.seen[seen:] for n, _ in obs] == [b"lone.txt"]
    finally:
        await observer.stop()
