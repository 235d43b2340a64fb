"""The watcher against a real aggregator, in-process, over real sockets.

A real `Aggregator` (gRPC and HTTP on 127.0.0.1 port 0) and a real
`watcher.app.Watcher` watching a `tmp_path` folder with watchdog run in this
event loop. The aggregator's list is read through its public `GET /files/`;
every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from aggregator.app import Aggregator
from aggregator.config import AggregatorConfig
from tests.support import wait_for_async
from watcher.app import Watcher
from watcher.config import WatcherConfig

HOST = "127.0.0.1"
SYNC_TIMEOUT = 15.0
"""Bound on "a change in the folder shows up at the aggregator"."""
POLL = 0.02
PRE_FILES = 2000
"""Files in the folder before the start-up race test (a scan long enough to race)."""

T = TypeVar("T")
Files = dict[bytes, int | None]
"""Raw file name -> size."""


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout: float = SYNC_TIMEOUT,
    what: str = "the condition",
) -> T:
    """Poll `probe` until `until(value)` holds; fail after `timeout` seconds."""
    return await wait_for_async(probe, timeout, until=until, what=what, interval=POLL)


def folder_files(folder: Path) -> Files:
    """The regular files directly in `folder`, with their sizes."""
    files: Files = {}
    with os.scandir(os.fsencode(folder)) as entries:
        for entry in entries:
            if entry.is_file():
                files[entry.name] = entry.stat().st_size
    return files


def difference(listed: Files, folder: Files) -> dict[str, list[tuple[bytes, int | None]]]:
    """What the aggregator lists wrongly: names missing, extra, or with another size."""
    return {
        "missing": sorted((n, s) for n, s in folder.items() if n not in listed),
        "extra": sorted((n, s) for n, s in listed.items() if n not in folder),
        "wrong_size": sorted(
            (n, listed[n]) for n, s in folder.items() if n in listed and listed[n] != s
        ),
    }


def write(folder: Path, name: str | bytes, data: bytes = b"x") -> None:
    """Create or overwrite a file (names may be bytes that are not UTF-8)."""
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    with open(path, "wb") as f:
        f.write(data)


@dataclass
class Harness:
    """One aggregator (replaceable on the same gRPC port) and the watchers of a test."""

    folder: Path
    session: aiohttp.ClientSession
    aggregator: Aggregator
    grpc_port: int
    watchers: list[tuple[Watcher, asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)
    observer: str = "auto"

    @staticmethod
    def config(grpc_port: int = 0) -> AggregatorConfig:
        """The aggregator's config: every port picked by the OS unless given."""
        return AggregatorConfig(http=(f"{HOST}:0",), grpc=f"{HOST}:{grpc_port}", ttl=1.0, grace=1.0)

    def watcher_config(self, **overrides: Any) -> WatcherConfig:
        """The watcher's config, pointed at this harness's gRPC port."""
        base = WatcherConfig(
            dir=str(self.folder),
            port=0,
            aggregator=f"grpc://{HOST}:{self.grpc_port}",
            heartbeat_interval=0.2,
            reconnect_max=0.3,
            rescan_interval=0.3,
            observer=self.observer,
        )
        return replace(base, **overrides)

    def launch(self, **overrides: Any) -> Watcher:
        """Run a watcher as a task until teardown (does not wait for it to start)."""
        watcher = Watcher(self.watcher_config(**overrides))
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop), name="watcher")
        self.watchers.append((watcher, stop, task))
        return watcher

    async def started(self, watcher: Watcher) -> str:
        """Wait until the watcher serves HTTP; returns its node name."""
        task = next(t for w, _, t in self.watchers if w is watcher)

        async def probe() -> int:
            if task.done():
                task.result()  # raises why the watcher ended
                pytest.fail("the watcher ended early")
            return watcher.http_port

        port = await eventually(probe, bool, what="the watcher to listen")
        return f"{socket.gethostname()}:{port}"

    async def start_watcher(self, **overrides: Any) -> tuple[Watcher, str]:
        """Launch a watcher and wait until it serves HTTP."""
        watcher = self.launch(**overrides)
        return watcher, await self.started(watcher)

    async def stop_watcher(self, watcher: Watcher) -> None:
        """Set the watcher's stop event and wait for it to end."""
        for w, stop, task in self.watchers:
            if w is watcher:
                stop.set()
                await asyncio.wait_for(task, SYNC_TIMEOUT)

    async def listed(self, node: str) -> Files:
        """What the aggregator's `GET /files/?detail=1` lists for `node`."""
        url = f"http://{HOST}:{self.aggregator.http_ports[0]}/files/?detail=1"
        async with self.session.get(url) as response:
            assert response.status == 200
            body = await response.json()
        return {
            os.fsencode(entry["filename"]): entry["size"]
            for entry in body["files"]
            if entry["node"] == node
        }

    async def in_sync(self, node: str, what: str = "the aggregator to list the folder") -> Files:
        """Wait until the aggregator lists exactly the folder's files for `node`."""
        listed: Files = {}

        async def probe() -> dict[str, list[tuple[bytes, int | None]]]:
            nonlocal listed
            listed = await self.listed(node)
            return difference(listed, folder_files(self.folder))

        await eventually(probe, lambda diff: not any(diff.values()), what=what)
        return listed


@pytest.fixture(params=["inotify", "watchdog"])
async def harness(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """A running aggregator; at teardown, watchers stop first, then the aggregator.

    Each test runs with both observers (`--observer`).
    """
    aggregator = Aggregator(Harness.config())
    await aggregator.start()
    async with aiohttp.ClientSession() as session:
        h = Harness(tmp_path, session, aggregator, aggregator.grpc_port, observer=request.param)
        try:
            yield h
            for _, stop, _ in h.watchers:
                stop.set()
            results = await asyncio.wait_for(
                asyncio.gather(*(t for _, _, t in h.watchers), return_exceptions=True),
                SYNC_TIMEOUT,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, f"watchers ended with errors: {errors!r}"
        finally:
            for _, stop, task in h.watchers:  # only left running if the above failed
                stop.set()
                task.cancel()
            await asyncio.gather(*(t for _, _, t in h.watchers), return_exceptions=True)
            await h.aggregator.stop()  # the current one; a replaced one was stopped


# ---------------------------------------------------------------- tests


async def test_the_initial_files_appear_at_the_aggregator(harness: Harness) -> None:
    folder = harness.folder
    write(folder, "cats.txt", b"meow")
    write(folder, "dogs.txt", b"woof!")
    write(folder, "with space 'q'.txt")
    write(folder, "😀.txt")
    write(folder, ".hidden")
    write(folder, b"caf\xe9.txt")  # not UTF-8
    (folder / "sub").mkdir()
    write(folder / "sub", "inner.txt")
    _, node = await harness.start_watcher()
    listed = await harness.in_sync(node)
    assert listed[b"cats.txt"] == 4
    assert listed[b"dogs.txt"] == 5
    assert b"caf\xe9.txt" in listed
    assert b"sub" not in listed
    assert b"inner.txt" not in listed


async def test_create_modify_delete_and_rename_show_up(harness: Harness) -> None:
    folder = harness.folder
    write(folder, "a.txt")
    write(folder, "b.txt")
    _, node = await harness.start_watcher()
    await harness.in_sync(node, "the initial list")

    write(folder, "new.txt", b"12345")
    listed = await harness.in_sync(node, "a created file")
    assert listed[b"new.txt"] == 5

    write(folder, "a.txt", b"a much longer content")
    listed = await harness.in_sync(node, "a modified file")
    assert listed[b"a.txt"] == len(b"a much longer content")

    (folder / "b.txt").unlink()
    listed = await harness.in_sync(node, "a deleted file")
    assert b"b.txt" not in listed

    (folder / "new.txt").rename(folder / "renamed.txt")
    listed = await harness.in_sync(node, "a renamed file")
    assert set(listed) == {b"a.txt", b"renamed.txt"}
    assert listed[b"renamed.txt"] == 5

    # Renamed over an existing file: the target keeps its name, the source goes.
    (folder / "renamed.txt").rename(folder / "a.txt")
    listed = await harness.in_sync(node, "a rename over an existing file")
    assert listed == {b"a.txt": 5}


async def test_a_subfolder_is_not_listed(harness: Harness) -> None:
    _, node = await harness.start_watcher()
    await harness.in_sync(node, "the empty list")
    (harness.folder / "sub").mkdir()
    write(harness.folder / "sub", "deep.txt")
    write(harness.folder, "marker.txt")  # reported after the events above
    listed = await harness.in_sync(node, "the marker file")
    assert listed == {b"marker.txt": 1}


async def test_the_watcher_serves_its_own_list(harness: Harness) -> None:
    write(harness.folder, "a.txt")
    write(harness.folder, "b.txt")
    watcher, node = await harness.start_watcher()
    await harness.in_sync(node)
    url = f"http://{HOST}:{watcher.http_port}/files"

    async def own_list() -> dict[str, Any]:
        async with harness.session.get(url) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            body: dict[str, Any] = await response.json()
            return body

    body = await own_list()
    assert set(body) == {"instance", "files", "seqno"}
    assert body["instance"] == watcher.instance
    assert sorted(f["filename"] for f in body["files"]) == ["a.txt", "b.txt"]
    assert all(set(f) == {"filename"} for f in body["files"])
    assert isinstance(body["seqno"], int)
    before = body["seqno"]

    write(harness.folder, "c.txt")
    body = await eventually(
        own_list, lambda b: len(b["files"]) == 3 and b["seqno"] > before, what="seqno to move"
    )
    assert sorted(f["filename"] for f in body["files"]) == ["a.txt", "b.txt", "c.txt"]
    await harness.in_sync(node)


async def test_stopping_the_watcher_says_goodbye(harness: Harness) -> None:
    write(harness.folder, "a.txt")
    watcher, node = await harness.start_watcher()
    await harness.in_sync(node)
    await harness.stop_watcher(watcher)
    # Goodbye: gone at once, not after the TTL.
    assert await harness.listed(node) == {}
    assert harness.aggregator.store.index.watcher(node) is None


async def test_an_aggregator_restart_loses_nothing(harness: Harness) -> None:
    folder = harness.folder
    for name in ("a.txt", "b.txt", "c.txt"):
        write(folder, name)
    _, node = await harness.start_watcher()
    await harness.in_sync(node, "the initial list")

    await harness.aggregator.stop()
    # Changes while no aggregator runs.
    write(folder, "while-down.txt", b"123")
    (folder / "a.txt").unlink()
    write(folder, "b.txt", b"bigger")
    harness.aggregator = Aggregator(Harness.config(harness.grpc_port))
    await harness.aggregator.start()
    assert harness.aggregator.grpc_port == harness.grpc_port
    # More changes while the watcher reconnects.
    write(folder, "while-reconnecting.txt")
    (folder / "c.txt").unlink()

    listed = await harness.in_sync(node, "the list after the reconnect")
    assert listed == {b"b.txt": 6, b"while-down.txt": 3, b"while-reconnecting.txt": 1}
    # And the stream is live again.
    write(folder, "after.txt")
    listed = await harness.in_sync(node, "a change after the reconnect")
    assert b"after.txt" in listed


async def test_a_long_outage_is_followed_by_a_prompt_reconnect(harness: Harness) -> None:
    # Reconnects use capped backoff, so once the aggregator is
    # back, the watcher is known again within about one capped delay, however
    # long the outage was.
    write(harness.folder, "a.txt")
    watcher, node = await harness.start_watcher()
    await harness.in_sync(node, "the initial list")
    await harness.aggregator.stop()
    # The outage under test (not a wait for a result): long enough for
    # several failed reconnects, whose delays must stay capped.
    await asyncio.sleep(6.5)
    write(harness.folder, "b.txt")
    harness.aggregator = Aggregator(Harness.config(harness.grpc_port))
    await harness.aggregator.start()
    restarted = time.monotonic()
    await harness.in_sync(node, "the list after the outage")
    took = time.monotonic() - restarted
    bound = watcher.config.reconnect_max * 5  # the cap, plus the snapshot, under load
    assert took < bound, f"reconnected {took:.2f} s after the restart (cap {bound:.2f} s)"


async def test_rescans_run_and_the_list_stays_equal_to_the_folder(harness: Harness) -> None:
    for i in range(5):
        write(harness.folder, f"f{i}.txt")
    watcher, node = await harness.start_watcher()
    await harness.in_sync(node)

    def rescans() -> float:
        return watcher.registry.get_sample_value("filewatch_watcher_rescans_total") or 0.0

    async def probe() -> float:
        return rescans()

    first = await eventually(probe, lambda n: n >= 1, what="a rescan")
    for i in range(5, 10):
        write(harness.folder, f"f{i}.txt")
    (harness.folder / "f0.txt").unlink()
    await eventually(probe, lambda n: n >= first + 2, what="two more rescans")
    listed = await harness.in_sync(node)
    assert len(listed) == 9
    # The observer saw the changes itself (rescans only back it up).
    assert (watcher.registry.get_sample_value("filewatch_watcher_fs_events_total") or 0) > 0


async def test_files_created_while_the_watcher_starts_are_not_missed(harness: Harness) -> None:
    # Files already there (a longer initial scan), then churn racing the start.
    folder = harness.folder
    done = threading.Event()
    created = 0

    def churn() -> None:
        # Creates, grows and deletes files until told to stop.
        nonlocal created
        while not done.is_set():
            write(folder, f"s{created:05d}.txt")
            if created % 7 == 3:
                os.unlink(folder / f"s{created - 1:05d}.txt")
            elif created % 5 == 1:
                write(folder, f"pre{created % PRE_FILES:04d}.txt", b"grown")
            created += 1

    for i in range(PRE_FILES):
        write(folder, f"pre{i:04d}.txt")
    thread = threading.Thread(target=churn, name="churn")
    thread.start()
    try:
        # No rescans: only the observer and the initial scan may find the files.
        watcher = harness.launch(rescan_interval=0)
        node = await harness.started(watcher)

        async def snapshot_in() -> Files:
            return await harness.listed(node)

        await eventually(
            snapshot_in, lambda files: len(files) >= PRE_FILES, what="the first snapshot"
        )
        start_count = created

        async def count() -> int:
            return created

        await eventually(count, lambda n: n >= start_count + 50, what="more files after the start")
    finally:
        done.set()
        await asyncio.to_thread(thread.join, SYNC_TIMEOUT)
    assert created > 50
    listed = await harness.in_sync(node, "every file created during the start")
    assert len(listed) == len(folder_files(folder))
    assert watcher.registry.get_sample_value("filewatch_watcher_rescans_total") == 0.0


async def test_churn_through_the_coalescing_path_ends_with_the_folder(harness: Harness) -> None:
    """Changes faster than the batch interval go together; none is lost.

    A thread creates, rewrites, renames and deletes files without pause while
    the watcher holds each batch for --batch-interval after the previous one:
    the batches are far fewer than the changes, and the list at the end is
    exactly the folder (names and sizes).
    """
    folder = harness.folder
    watcher, node = await harness.start_watcher(batch_interval=0.05, max_batch=50)
    await harness.in_sync(node, "the empty folder")
    ops = 0

    def churn() -> None:
        nonlocal ops
        for i in range(600):
            name = folder / f"c{i % 97:02d}.txt"
            if name.exists() and i % 3 == 0:
                name.unlink()
            elif name.exists() and i % 3 == 1:
                name.rename(folder / f"r{i % 89:02d}.txt")
            else:
                name.write_bytes(b"x" * (i % 50))
            ops += 1

    await asyncio.to_thread(churn)
    await harness.in_sync(node, "the folder after the churn")
    target = {"target": watcher.config.targets[0]}
    batches = watcher.registry.get_sample_value("filewatch_watcher_batches_sent_total", target)
    assert batches is not None
    assert 0 < batches < ops / 3, f"{batches} batches for {ops} changes: nothing coalesced"
