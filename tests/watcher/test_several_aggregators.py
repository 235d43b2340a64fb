"""One watcher, two aggregators (`-aggregator grpc://a,grpc://b`): equal replicas.

Two real `Aggregator`s and a real `Watcher` in this event loop, over real
sockets. Each aggregator gets its own Sync stream; stopping one never holds
back the other, and a restarted one converges from a snapshot.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from aggregator.app import Aggregator
from aggregator.config import AggregatorConfig
from tests.support import wait_for_async
from watcher.app import Watcher
from watcher.config import WatcherConfig

HOST = "127.0.0.1"
TIMEOUT = 15.0


def aggregator_config(grpc_port: int = 0) -> AggregatorConfig:
    """Every port picked by the OS unless given."""
    return AggregatorConfig(http=(f"{HOST}:0",), grpc=f"{HOST}:{grpc_port}", ttl=1.0, grace=1.0)


async def listed(session: aiohttp.ClientSession, aggregator: Aggregator) -> list[str]:
    """The names `GET /files/` lists."""
    async with session.get(f"http://{HOST}:{aggregator.http_ports[0]}/files/") as response:
        assert response.status == 200
        body = await response.json()
    return [entry["filename"] for entry in body["files"]]


def folder_names(folder: Path) -> list[str]:
    """The folder's files, sorted as the aggregator sorts them."""
    return sorted(os.listdir(folder), key=os.fsencode)


async def lists_the_folder(
    session: aiohttp.ClientSession, aggregator: Aggregator, folder: Path, what: str
) -> None:
    """Wait until `aggregator` lists exactly the folder."""
    await wait_for_async(
        lambda: listed(session, aggregator),
        TIMEOUT,
        until=lambda names: names == folder_names(folder),
        what=what,
        interval=0.02,
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def replicas() -> AsyncIterator[list[Aggregator]]:
    """Two running aggregators; the test may replace one (the list holds the current ones)."""
    aggregators = [Aggregator(aggregator_config()), Aggregator(aggregator_config())]
    for a in aggregators:
        await a.start()
    try:
        yield aggregators
    finally:
        for a in aggregators:
            await a.stop()


@pytest.mark.parametrize("observer", ["inotify", "watchdog"])
async def test_one_watcher_feeds_two_aggregators_and_either_can_go(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    replicas: list[Aggregator],
    observer: str,
) -> None:
    a, b = replicas
    (tmp_path / "before.txt").write_bytes(b"0")
    targets = [f"grpc://{HOST}:{r.grpc_port}" for r in replicas]
    config = WatcherConfig(
        dir=str(tmp_path),
        port=0,
        aggregator=",".join(targets),
        heartbeat_interval=0.2,
        reconnect_max=0.2,
        rescan_interval=0,
        observer=observer,
    )
    watcher = Watcher(config)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        await lists_the_folder(session, a, tmp_path, "replica a to list the folder")
        await lists_the_folder(session, b, tmp_path, "replica b to list the folder")
        for i in range(20):
            (tmp_path / f"both-{i}.txt").write_bytes(b"x" * i)
        await lists_the_folder(session, a, tmp_path, "a to follow the changes")
        await lists_the_folder(session, b, tmp_path, "b to follow the changes")

        # b goes away: a follows every change as before, b's link says so.
        b_grpc_port = b.grpc_port
        await b.stop()
        for i in range(20):
            (tmp_path / f"alone-{i}.txt").write_bytes(b"y")
        (tmp_path / "both-3.txt").unlink()
        (tmp_path / "both-4.txt").rename(tmp_path / "renamed.txt")
        await lists_the_folder(session, a, tmp_path, "a to follow while b is down")
        health = await wait_for_async(
            lambda: asyncio.sleep(0, watcher.health()),
            TIMEOUT,
            until=lambda h: [t["stream"] for t in h["targets"]][1] != "live",
            what="the watcher to see b gone",
        )
        assert [t["target"] for t in health["targets"]] == targets
        assert health["targets"][0]["stream"] == "live"
        assert health["stream"] != "live"  # not every target is live
        assert health["status"] == "ok"  # a replica down is not a refusal

        # b comes back on its port, empty: it converges from a snapshot.
        replicas[1] = b = Aggregator(aggregator_config(b_grpc_port))
        await b.start()
        await lists_the_folder(session, b, tmp_path, "the restarted b to converge")
        (tmp_path / "after.txt").write_bytes(b"z")
        await lists_the_folder(session, a, tmp_path, "a to list a change after b is back")
        await lists_the_folder(session, b, tmp_path, "b to list a change after it is back")
        await wait_for_async(
            lambda: asyncio.sleep(0, watcher.health()["stream"]),
            TIMEOUT,
            until=lambda s: s == "live",
            what="both links live",
        )

        def sent(metric: str, target: str) -> float:
            value = watcher.registry.get_sample_value(metric, {"target": target})
            assert value is not None, f"{metric} has no sample for {target}"
            return value

        # Metrics by target: b got two snapshots (its first stream and after the
        # restart), a one; each target got batches.
        assert sent("filewatch_watcher_snapshots_sent_total", targets[0]) == 1
        assert sent("filewatch_watcher_snapshots_sent_total", targets[1]) == 2
        assert sent("filewatch_watcher_batches_sent_total", targets[0]) > 0
        assert sent("filewatch_watcher_batches_sent_total", targets[1]) > 0
        assert sent("filewatch_watcher_batches_behind", targets[1]) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


async def test_a_refusing_replica_makes_the_watcher_failing_and_the_other_still_serves(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A token one replica requires and the watcher lacks: /healthz says which target."""
    open_one = Aggregator(aggregator_config())
    guarded = Aggregator(
        AggregatorConfig(http=(f"{HOST}:0",), grpc=f"{HOST}:0", ttl=1.0, grace=1.0, token="s3")  # noqa: S106
    )
    await open_one.start()
    await guarded.start()
    stop = asyncio.Event()
    try:
        targets = [f"grpc://{HOST}:{open_one.grpc_port}", f"grpc://{HOST}:{guarded.grpc_port}"]
        watcher = Watcher(
            WatcherConfig(
                dir=str(tmp_path), port=0, aggregator=",".join(targets), rescan_interval=0
            )
        )
        task = asyncio.create_task(watcher.run(stop))
        (tmp_path / "f.txt").write_bytes(b"1")
        await lists_the_folder(session, open_one, tmp_path, "the open replica to list the folder")
        health = await wait_for_async(
            lambda: asyncio.sleep(0, watcher.health()),
            TIMEOUT,
            until=lambda h: h["status"] == "failing",
            what="the refusal to show",
        )
        assert health["reason"].startswith(f"{targets[1]}: UNAUTHENTICATED")
        assert health["targets"][0]["refusal"] is None
        assert await listed(session, guarded) == []
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    finally:
        stop.set()
        await open_one.stop()
        await guarded.stop()
