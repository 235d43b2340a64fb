"""End to end over the legacy HTTP protocol: our Python watcher in http:// mode, real processes.

One aggregator is shared by the tests that do not disturb each other (each watcher
is its own node, "127.0.0.1:<port>", and every check filters on it); tests that
kill or restart the aggregator, or read the whole list, start their own.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.legacy.conftest import (
    GAP_WAIT,
    SYNC_TIMEOUT,
    TTL,
    AggregatorFactory,
    AggregatorProc,
    DroppingProxy,
    Folders,
    Processes,
    WatcherFactory,
    async_node_files,
    entries,
    files_body,
    node_files,
)
from tests.support import HOST, wait_for, wait_for_async

SAMPLE1 = ["cats.txt", "dogs.txt"]
SAMPLE2 = ["lions.txt", "tigers.txt"]


@pytest.fixture(scope="module")
def shared_agg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AggregatorProc]:
    """One aggregator for the tests of this module that do not disturb each other."""
    p = Processes(tmp_path_factory.mktemp("legacy-e2e-aggregator"))
    try:
        yield p.start_aggregator()
    finally:
        p.stop_all()


def legacy_url(agg: AggregatorProc) -> str:
    """The -aggregator flag of a watcher speaking the legacy protocol to `agg`."""
    return f"http://{HOST}:{agg.http_port}"


def wait_listed(agg: AggregatorProc, node: str, expected: list[str], timeout: float) -> None:
    """Poll until the aggregator lists exactly `expected` (sorted) for `node`."""
    wait_for(
        lambda: node_files(agg.http_port, node),
        timeout,
        until=lambda names: names == sorted(expected),
        what=f"{node} to list {sorted(expected)}",
    )


# ---------------------------------------------------------------- basics


def test_initial_list(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    mine = [e for e in entries(shared_agg.http_port) if e["node"] == w.node]
    # The Go watcher reports no size or time; the entries say so rather than invent them.
    assert mine == [
        {"filename": "cats.txt", "node": w.node, "size": None, "modified": None},
        {"filename": "dogs.txt", "node": w.node, "size": None, "modified": None},
    ]


def test_add(shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    (folders.folder1 / "birds.txt").write_text("tweet")
    wait_listed(shared_agg, w.node, [*SAMPLE1, "birds.txt"], SYNC_TIMEOUT)


def test_remove(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    (folders.folder1 / "cats.txt").unlink()
    wait_listed(shared_agg, w.node, ["dogs.txt"], SYNC_TIMEOUT)


def test_rename(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    (folders.folder1 / "dogs.txt").rename(folders.folder1 / "puppies.txt")
    wait_listed(shared_agg, w.node, ["cats.txt", "puppies.txt"], SYNC_TIMEOUT)


def test_thousand_files_appear_then_all_disappear(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    names = [f"bulk-{i:04d}.txt" for i in range(1000)]
    for name in names:
        (folders.folder1 / name).write_bytes(b"x")
    wait_listed(shared_agg, w.node, [*SAMPLE1, *names], 30)
    for name in names:
        (folders.folder1 / name).unlink()
    wait_listed(shared_agg, w.node, SAMPLE1, 30)


def test_a_large_folder_is_listed_whole(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    """The initial list comes from one GET /files of the watcher: ~250 KB here."""
    names = [f"{i:04d}-{'long-name-' * 22}.txt" for i in range(1000)]
    for name in names:
        (folders.folder2 / name).write_bytes(b"")
    w = start_watcher(folders.folder2, legacy_url(shared_agg))

    def outcome() -> list[dict[str, Any]]:
        return [
            e
            for e in shared_agg.proc.events()
            if e.get("node") == w.node
            and e.get("event") in ("legacy_snapshot_installed", "legacy_fetch_failed")
        ]

    first = wait_for(outcome, SYNC_TIMEOUT, what="the list fetch")[0]
    assert first["event"] == "legacy_snapshot_installed", first
    assert node_files(shared_agg.http_port, w.node) == sorted([*SAMPLE2, *names])


# ---------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_says_bye_and_files_go_at_once(
    shared_agg: AggregatorProc,
    start_watcher: WatcherFactory,
    folders: Folders,
    sig: signal.Signals,
) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    w.proc.send(sig)
    assert w.proc.wait_exit() == 0
    # The bye was answered before the watcher exited, and a bye removes at once:
    # no poll, no TTL.
    assert node_files(shared_agg.http_port, w.node) == []
    byes = [e for e in shared_agg.proc.events("legacy_bye") if e.get("node") == w.node]
    assert len(byes) == 1, byes
    assert byes[0]["files_removed"] == 2


def test_sigkill_files_go_after_the_ttl(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    w.proc.kill()
    killed = time.monotonic()
    # Not at once: a vanished watcher keeps its files for the TTL (no flapping).
    time.sleep(0.8)
    assert node_files(shared_agg.http_port, w.node) == SAMPLE1
    wait_for(
        lambda: node_files(shared_agg.http_port, w.node),
        TTL + 3,
        until=lambda names: names == [],
        what="the TTL to evict the killed watcher",
    )
    elapsed = time.monotonic() - killed
    # Its last hello came at most one hello period (1 s) before the kill.
    assert elapsed >= TTL - 1.0 - 0.3, elapsed
    assert any(e.get("node") == w.node for e in shared_agg.proc.events("watcher_expired"))


def test_a_watcher_back_after_eviction_is_listed_again_within_a_hello_period(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    """Frozen (a network cut) longer than the TTL, then back: its next hello lists it."""
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    w.proc.send(signal.SIGSTOP)
    try:
        wait_listed(shared_agg, w.node, [], TTL + 3)
    finally:
        w.proc.send(signal.SIGCONT)
    back = time.monotonic()
    wait_listed(shared_agg, w.node, SAMPLE1, TTL + 3)
    elapsed = time.monotonic() - back
    assert elapsed < 1.0 + 1.0, f"listed again only after {elapsed:.2f} s"


# ---------------------------------------------------------------- restarts


def test_watcher_restart_new_instance_replaces_old_list(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    first = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, first.node, SAMPLE1, SYNC_TIMEOUT)
    first.proc.kill()  # no bye: only the new instance's hello can replace the list
    (folders.folder1 / "cats.txt").unlink()
    (folders.folder1 / "hamsters.txt").write_text("squeak")
    second = start_watcher(folders.folder1, legacy_url(shared_agg), port=first.port)
    assert second.port == first.port
    assert second.instance != first.instance
    universe = {"cats.txt", "dogs.txt", "hamsters.txt"}
    expected = ["dogs.txt", "hamsters.txt"]
    polls = 0

    def probe() -> list[str]:
        nonlocal polls
        polls += 1
        listed = [e["filename"] for e in entries(shared_agg.http_port)]
        counts = Counter(n for n in listed if n in universe)
        dupes = [n for n, c in counts.items() if c > 1]
        assert not dupes, f"duplicate entries at poll {polls}: {dupes}"
        return node_files(shared_agg.http_port, second.node)

    wait_for(probe, SYNC_TIMEOUT, until=lambda names: names == expected, what="the new list")
    # Well before the TTL: the old files went because the new instance replaced them.
    time.sleep(0.3)
    assert probe() == expected
    assert [e["filename"] for e in entries(shared_agg.http_port)].count("dogs.txt") == 1


def test_aggregator_restart_full_list_back_within_a_hello_period(
    procs: Processes, start_watcher: WatcherFactory, folders: Folders
) -> None:
    agg = procs.start_aggregator()
    w1 = start_watcher(folders.folder1, legacy_url(agg), hello_interval=1.0)
    w2 = start_watcher(folders.folder2, legacy_url(agg), hello_interval=1.0)
    wait_listed(agg, w1.node, SAMPLE1, SYNC_TIMEOUT)
    wait_listed(agg, w2.node, SAMPLE2, SYNC_TIMEOUT)
    agg.proc.kill()
    (folders.folder2 / "cubs.txt").write_text("made while the aggregator was down")
    again = procs.start_aggregator(http_port=agg.http_port, grpc_port=agg.grpc_port)
    assert (again.http_port, again.grpc_port) == (agg.http_port, agg.grpc_port)
    started = time.monotonic()
    expected = sorted([*SAMPLE1, *SAMPLE2, "cubs.txt"])
    wait_for(
        lambda: [e["filename"] for e in entries(again.http_port)],
        SYNC_TIMEOUT,
        until=lambda names: names == expected,
        what="the full list after the restart",
    )
    elapsed = time.monotonic() - started
    # Hello period 1 s: each watcher says hello within it, and its list is fetched then
    # (2 s of slack for a loaded machine; the TTL plays no part).
    assert elapsed < 1.0 + 2.0, f"full list back after {elapsed:.2f} s"
    assert node_files(again.http_port, w1.node) == SAMPLE1
    assert node_files(again.http_port, w2.node) == sorted([*SAMPLE2, "cubs.txt"])


# ---------------------------------------------------------------- a lost PATCH


async def test_lost_patch_is_repaired_by_a_refetch(
    shared_agg: AggregatorProc,
    procs: Processes,
    folders: Folders,
    session: aiohttp.ClientSession,
) -> None:
    proxy = DroppingProxy(shared_agg.http_port, session)
    await proxy.start()
    try:
        url = f"http://{HOST}:{proxy.port}"
        # No repair rescans: only the aggregator's gap detection can bring the file back.
        w = await asyncio.to_thread(
            procs.start_watcher, folders.folder1, url, "--rescan-interval", "0"
        )

        async def listed() -> list[str]:
            return await async_node_files(session, shared_agg.http_port, w.node)

        await wait_for_async(listed, SYNC_TIMEOUT, until=lambda n: n == SAMPLE1, what="list")
        proxy.drop_next_patch()
        (folders.folder1 / "lost.txt").write_text("its PATCH is lost")

        async def dropped() -> int:
            return len(proxy.dropped)

        await wait_for_async(dropped, SYNC_TIMEOUT, what="the proxy to lose a PATCH")
        lost = json.loads(proxy.dropped[0])
        assert [(o["op"], o["value"]["filename"], o["seqno"]) for o in lost] == [
            ("add", "lost.txt", 2)
        ]
        assert await listed() == SAMPLE1  # the watcher never retries a PATCH answered 200
        (folders.folder1 / "next.txt").write_text("seqno 3: the gap shows")
        await wait_for_async(
            listed,
            GAP_WAIT + SYNC_TIMEOUT,
            until=lambda n: n == ["cats.txt", "dogs.txt", "lost.txt", "next.txt"],
            what="the refetch to repair the lost PATCH",
        )
        gaps = [e for e in shared_agg.proc.events("legacy_gap") if e.get("node") == w.node]
        assert gaps, "the repair must come from the gap refetch"
    finally:
        await asyncio.to_thread(procs.stop_all)
        await proxy.close()


# ---------------------------------------------------------------- both protocols


def test_grpc_and_legacy_watchers_in_one_sorted_list(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, folders: Folders
) -> None:
    agg = start_aggregator()
    (folders.folder1 / "zebras.txt").write_text("in folder1")
    (folders.folder2 / "zebras.txt").write_text("in folder2")
    grpc_w = start_watcher(folders.folder1, agg.grpc_url)
    legacy_w = start_watcher(folders.folder2, legacy_url(agg))
    expected = sorted([*SAMPLE1, *SAMPLE2, "zebras.txt", "zebras.txt"])
    wait_for(
        lambda: [e["filename"] for e in entries(agg.http_port)],
        SYNC_TIMEOUT,
        until=lambda names: names == expected,
        what="both watchers' files",
    )
    body = files_body(agg.http_port)
    assert (
        body
        == json.dumps(
            {"files": [{"filename": n} for n in expected]}, separators=(",", ":")
        ).encode()
    )
    listed = entries(agg.http_port)
    assert [(e["filename"], e["node"]) for e in listed] == sorted(
        (e["filename"], e["node"]) for e in listed
    )
    nodes = {e["filename"]: e["node"] for e in listed if e["filename"] != "zebras.txt"}
    assert nodes["lions.txt"] == nodes["tigers.txt"] == legacy_w.node
    assert nodes["cats.txt"] == nodes["dogs.txt"] != legacy_w.node
    assert nodes["cats.txt"].endswith(f":{grpc_w.port}")
    assert {e["node"] for e in listed if e["filename"] == "zebras.txt"} == {
        legacy_w.node,
        nodes["cats.txt"],
    }


# ---------------------------------------------------------------- lag


def test_lag_from_creation_to_listing(
    shared_agg: AggregatorProc, start_watcher: WatcherFactory, folders: Folders
) -> None:
    """Median lag (file created -> listed by GET /files/) over 20 trials, printed."""
    w = start_watcher(folders.folder1, legacy_url(shared_agg))
    wait_listed(shared_agg, w.node, SAMPLE1, SYNC_TIMEOUT)
    conn = http.client.HTTPConnection(HOST, shared_agg.http_port, timeout=5)
    lags: list[float] = []
    try:
        for i in range(20):
            name = f"lag-{i:02d}.txt"
            needle = json.dumps(name).encode()
            path = folders.folder1 / name
            created = time.perf_counter()
            fd = os.open(path, os.O_CREAT | os.O_WRONLY)
            os.close(fd)
            deadline = created + SYNC_TIMEOUT
            while True:
                conn.request("GET", "/files/")
                body = conn.getresponse().read()
                if needle in body:
                    lags.append(time.perf_counter() - created)
                    break
                assert time.perf_counter() < deadline, f"{name} never listed"
                time.sleep(0.001)
    finally:
        conn.close()
    median = statistics.median(lags)
    print(
        f"\nlegacy lag over {len(lags)} trials: median {median * 1000:.1f} ms, "
        f"min {min(lags) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms"
    )
    assert median < 0.5, lags
