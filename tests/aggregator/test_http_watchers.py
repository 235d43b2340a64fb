"""`GET /watchers` and the link state behind it (`Liveness.presence`).

A real `Aggregator` on 127.0.0.1 port 0, a raw gRPC `Sync` peer and a legacy
watcher played over the wire (its `POST /hello`s, and an aiohttp server
answering the list fetch as the Go watcher does); read with a real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from aggregator.http_gateway import make_app
from aggregator.index import Index, pack_meta
from aggregator.liveness import LATE_PERIODS, Liveness, Presence
from aggregator.store import Store
from aggregator.telemetry import Metrics
from tests.aggregator.grpc_support import HOST, TIMEOUT, AggregatorFactory, Peer, add, open_channel
from tests.support import wait_for_async

HELLO_PERIOD = 0.2
"""The legacy watcher's hello period in these tests (and the aggregator's --legacy-hello-period)."""

# ---------------------------------------------------------------- Liveness.presence


def test_a_stream_is_connected_while_open_and_lost_after_a_break() -> None:
    liveness = Liveness(ttl=10.0)
    assert liveness.presence("a", 0.0) is None
    liveness.seen("a", "grpc", now=100.0)
    assert liveness.presence("a", 100.0) == Presence("grpc", True, 100.0)
    liveness.heard("a", now=105.0)
    assert liveness.presence("a", 500.0) == Presence("grpc", True, 105.0)  # open: silence is fine
    liveness.vanished("a", now=106.0)
    assert liveness.presence("a", 106.0) == Presence("grpc", False, 105.0)
    liveness.seen("a", "grpc", now=107.0)  # it reconnected
    assert liveness.presence("a", 107.0) == Presence("grpc", True, 107.0)
    liveness.forget("a")
    assert liveness.presence("a", 107.0) is None


def test_a_periodic_watcher_is_lost_once_its_hellos_are_late() -> None:
    liveness = Liveness(ttl=10.0)
    liveness.seen("b", "legacy", now=100.0, at_least=15.0, period=5.0)
    late = 100.0 + LATE_PERIODS * 5.0
    assert liveness.presence("b", late) == Presence("legacy", True, 100.0)
    assert liveness.presence("b", late + 0.01) == Presence("legacy", False, 100.0)
    liveness.seen("b", "legacy", now=late + 1, at_least=15.0, period=5.0)
    assert liveness.presence("b", late + 1) == Presence("legacy", True, late + 1)
    assert liveness.expired(late + 1 + 15.0) == ["b"]
    assert liveness.presence("b", late + 1 + 15.0) is None


# ---------------------------------------------------------------- the endpoint


async def get_watchers(session: aiohttp.ClientSession, port: int) -> list[dict[str, Any]]:
    """GET /watchers, checked for its type, parsed."""
    async with session.get(f"http://{HOST}:{port}/watchers") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        doc = orjson.loads(await response.read())
    assert list(doc) == ["watchers"]
    watchers: list[dict[str, Any]] = doc["watchers"]
    return watchers


def seen_at(watcher: dict[str, Any]) -> datetime:
    """A watcher's `last_seen`, parsed (it must be RFC 3339 UTC)."""
    text = watcher["last_seen"]
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


@contextlib.asynccontextmanager
async def legacy_watcher(
    session: aiohttp.ClientSession, aggregator_port: int, files: list[str], seqno: int
) -> AsyncIterator[tuple[str, str, asyncio.Task[None]]]:
    """A legacy watcher saying hello every HELLO_PERIOD: (node, instance, its hello task)."""
    instance = str(uuid.uuid4())
    listing = {"instance": instance, "seqno": seqno, "files": [{"filename": f} for f in files]}

    async def get_files(request: web.Request) -> web.Response:
        return web.json_response(listing)

    app = web.Application()
    app.router.add_get("/files", get_files)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, 0).start()
        port = runner.addresses[0][1]

        async def say_hello() -> None:
            hello = orjson.dumps({"instance": instance, "port": port})
            while True:
                async with session.post(
                    f"http://{HOST}:{aggregator_port}/hello", data=hello
                ) as response:
                    assert response.status == 200, await response.text()
                await asyncio.sleep(HELLO_PERIOD)  # the watcher's ticker, not a wait

        hellos = asyncio.create_task(say_hello())
        try:
            yield f"{HOST}:{port}", instance, hellos
        finally:
            hellos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hellos
    finally:
        await runner.cleanup()


async def test_watchers_lists_both_protocols_connected_then_lost_then_gone(
    make_aggregator: AggregatorFactory,
) -> None:
    aggregator = await make_aggregator(
        ttl=1.5, legacy_hello_period=HELLO_PERIOD, legacy_missed_hellos=3
    )
    port = aggregator.http_ports[0]
    async with aiohttp.ClientSession() as session:
        assert await get_watchers(session, port) == []
        async with (
            open_channel(aggregator) as channel,
            legacy_watcher(session, port, ["l1.txt", "l2.txt", "l3.txt"], seqno=4) as legacy,
        ):
            legacy_node, instance, hellos = legacy
            peer = Peer(channel, "zz-grpc", epoch="epoch-g")
            await peer.join([b"g1.txt"])
            await peer.batch(1, add(b"g2.txt"))
            assert (await peer.heartbeat(1)).ack.applied_sequence == 1

            async def watchers() -> list[dict[str, Any]]:
                return await get_watchers(session, port)

            listed = await wait_for_async(
                watchers, TIMEOUT, until=lambda w: len(w) == 2 and w[0]["files"] == 3
            )
            now = datetime.now(UTC)
            for watcher in listed:
                assert abs((now - seen_at(watcher)).total_seconds()) < 2, watcher
            assert [{k: v for k, v in w.items() if k != "last_seen"} for w in listed] == [
                {
                    "name": legacy_node,
                    "protocol": "legacy",
                    "state": "connected",
                    "files": 3,
                    "epoch": instance,
                    "sequence": 4,
                },
                {
                    "name": "zz-grpc",
                    "protocol": "grpc",
                    "state": "connected",
                    "files": 2,
                    "epoch": "epoch-g",
                    "sequence": 1,
                },
            ]
            # Both die: the stream is cut (no goodbye), the hellos stop.
            peer.call.cancel()
            hellos.cancel()

            lost = await wait_for_async(
                watchers, TIMEOUT, until=lambda w: [x["state"] for x in w] == ["lost", "lost"]
            )
            assert [(w["name"], w["files"]) for w in lost] == [(legacy_node, 3), ("zz-grpc", 2)]
            again = await watchers()
            assert [w["last_seen"] for w in again] == [w["last_seen"] for w in lost]
            # After the TTL their files go, and so do they.
            assert await wait_for_async(watchers, TIMEOUT, until=lambda w: w == []) == []


async def test_a_watcher_that_liveness_does_not_know_is_listed_as_lost() -> None:
    metrics = Metrics()
    store = Store(Index(), metrics)
    store.index.begin_snapshot("node-a", "e1")
    store.index.extend_snapshot("node-a", [(b"a.txt", pack_meta(1, 1))])
    store.commit_snapshot("node-a", 7, "test")
    runner = web.AppRunner(make_app(store, metrics), handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, 0).start()
        async with aiohttp.ClientSession() as session:
            listed = await get_watchers(session, runner.addresses[0][1])
    finally:
        await runner.cleanup()
    assert listed == [
        {
            "name": "node-a",
            "protocol": None,
            "state": "lost",
            "files": 1,
            "epoch": "e1",
            "sequence": 7,
            "last_seen": None,
        }
    ]


@pytest.mark.parametrize("names", [["b", "a", "é", "B", "😀"]])
async def test_watchers_are_sorted_by_name_in_code_point_order(
    make_aggregator: AggregatorFactory, names: list[str]
) -> None:
    aggregator = await make_aggregator()
    async with open_channel(aggregator) as channel, aiohttp.ClientSession() as session:
        peers = [Peer(channel, name) for name in names]  # each stream stays open
        for peer in peers:
            await peer.join([b"f.txt"])
        listed = await get_watchers(session, aggregator.http_ports[0])
    assert [w["name"] for w in listed] == sorted(names)
    assert all(w["protocol"] == "grpc" and w["state"] == "connected" for w in listed)
