"""`GET /files/events` (Server-Sent Events) over real sockets.

The production `make_app` with an `EventStreams` of test-sized limits is served
on 127.0.0.1 port 0 and read with a real aiohttp client (and, for a client
that never reads, a raw socket with a small receive buffer); changes go in
through the `Store`, on the same event loop, as the ingestion adapters do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web

from aggregator.app import Aggregator
from aggregator.http_events import EventStreams
from aggregator.http_gateway import make_app
from aggregator.index import NO_META, Change, Index, Meta, Op, pack_meta
from aggregator.store import Store
from aggregator.telemetry import Metrics
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc
from tests.aggregator.grpc_support import BASE_CONFIG, Peer, add, modify, open_channel, remove
from tests.support import wait_for_async

HOST = "127.0.0.1"
TIMEOUT = 5.0
MTIME_NS = 1_700_000_000_123_456_000
MTIME_TEXT = "2023-11-14T22:13:20.123456Z"
FIRST_VERSION = 5_000
"""Where the test index starts: a version is not a count of events."""


@dataclass(frozen=True)
class Sse:
    """One parsed Server-Sent Event (or comment)."""

    event: str
    id: int | None
    data: Any
    comment: str = ""


def parse(block: bytes) -> Sse:
    """One event block (without its blank line) of a text/event-stream."""
    fields: dict[str, str] = {}
    comment = ""
    for line in block.decode("utf-8").split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
            continue
        name, _, value = line.partition(": ")
        assert name not in fields, block  # one line per field: data is one line of JSON
        fields[name] = value
    raw_id = fields.get("id")
    data = json.loads(fields["data"]) if "data" in fields else None
    return Sse(fields.get("event", ""), int(raw_id) if raw_id else None, data, comment)


class Stream:
    """One open `/files/events` response, read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = TIMEOUT) -> Sse:
        """The next event (or comment); fails after `timeout` s."""
        async with asyncio.timeout(timeout):
            block = await self.response.content.readuntil(b"\n\n")
        assert block.endswith(b"\n\n"), f"the stream ended: {block!r}"
        return parse(block[:-2])

    async def events(self, count: int) -> list[Sse]:
        """The next `count` events, comments skipped."""
        out: list[Sse] = []
        while len(out) < count:
            item = await self.next()
            if not item.comment:
                out.append(item)
        return out

    async def rest(self) -> list[Sse]:
        """Every event until the server ends the stream."""
        async with asyncio.timeout(TIMEOUT):
            body = await self.response.content.read()
        return [parse(b) for b in body.split(b"\n\n") if b]

    def close(self) -> None:
        """Drop the connection (the client goes away)."""
        self.response.close()


@dataclass
class Gateway:
    """A served app with its store, its event streams and a client session."""

    store: Store
    metrics: Metrics
    events: EventStreams
    base: str
    session: aiohttp.ClientSession
    runner: web.AppRunner

    @contextlib.asynccontextmanager
    async def stream(self, query: str = "", **headers: str) -> AsyncIterator[Stream]:
        """An open `/files/events` stream (status 200 asserted)."""
        async with self.session.get(f"{self.base}/files/events{query}", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"] == "text/event-stream"
            yield Stream(resp)

    async def get(self, path: str, **headers: str) -> tuple[int, Mapping[str, str], bytes]:
        """One plain GET: (status, headers, body)."""
        async with self.session.get(self.base + path, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()

    def install(self, node: str, files: Mapping[bytes, Meta]) -> None:
        """Install `files` as the snapshot of `node`, as the Sync stream does."""
        self.store.index.begin_snapshot(node, "epoch-1")
        self.store.index.extend_snapshot(node, files.items())
        self.store.commit_snapshot(node, 0, "test")

    def apply(self, node: str, sequence: int, *changes: Change) -> None:
        """Apply one batch, as the Sync stream does."""
        self.store.apply_batch(node, "epoch-1", sequence, changes, protocol="grpc")

    @property
    def version(self) -> int:
        """The index version now."""
        return self.store.index.version


class GatewayFactory(Protocol):
    """Serves a gateway whose store and event streams take these limits."""

    async def __call__(
        self,
        *,
        reader_queue: int = 10_000,
        history: int = 10_000,
        max_clients: int = 1000,
        write_timeout: float = 5.0,
        keepalive: float = 15.0,
    ) -> Gateway: ...


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Gateways on real sockets, all cleaned up (runner first) at the end."""
    made: list[Gateway] = []

    async def factory(
        *,
        reader_queue: int = 10_000,
        history: int = 10_000,
        max_clients: int = 1000,
        write_timeout: float = 5.0,
        keepalive: float = 15.0,
    ) -> Gateway:
        metrics = Metrics()
        store = Store(
            Index(first_version=FIRST_VERSION), metrics, reader_queue=reader_queue, history=history
        )
        events = EventStreams(
            store, max_clients=max_clients, write_timeout=write_timeout, keepalive=keepalive
        )
        runner = web.AppRunner(make_app(store, metrics, events=events), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        session = aiohttp.ClientSession()
        base = f"http://{HOST}:{runner.addresses[0][1]}"
        made.append(Gateway(store, metrics, events, base, session, runner))
        return made[-1]

    try:
        yield factory
    finally:
        for gateway in reversed(made):
            await gateway.runner.cleanup()
            await gateway.session.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    """A gateway with the default limits."""
    return await make_gateway()


def meta(size: int = 1, mtime_ns: int = MTIME_NS) -> Meta:
    """File metadata with defaults."""
    return pack_meta(size, mtime_ns)


def entry(filename: str, node: str, size: int | None, modified: str | None) -> dict[str, Any]:
    """A `/files/?detail=1` entry."""
    return {"filename": filename, "node": node, "size": size, "modified": modified}


def counter(metrics: Metrics, name: str) -> float:
    """One unlabelled sample of the metrics (0 when absent)."""
    return metrics.registry.get_sample_value(name) or 0.0


# ---------------------------------------------------------------- the start and the changes


async def test_a_new_client_gets_the_version_first(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta(), b"b.txt": meta()})
    version = gateway.version
    assert version == FIRST_VERSION + 2
    async with gateway.stream() as stream:
        assert stream.response.headers["Cache-Control"] == "no-cache"
        first = await stream.next()
        assert first == Sse("version", version, {"version": version, "count": 2})
        # The page's list and the stream agree on the version.
        _, _, body = await gateway.get("/files/?detail=1")
        assert json.loads(body)["version"] == version


async def test_changes_come_as_add_modify_remove_with_ids_in_order(gateway: Gateway) -> None:
    gateway.install("node-a", {b"keep.txt": meta()})
    async with gateway.stream() as stream:
        start = (await stream.next()).id
        assert start == gateway.version
        later = MTIME_NS + 5_000_000_000
        gateway.apply("node-a", 1, Change(Op.ADD, b"new.txt", meta(size=3)))
        gateway.apply("node-a", 2, Change(Op.MODIFY, b"new.txt", meta(size=9, mtime_ns=later)))
        gateway.apply(
            "node-a", 3, Change(Op.REMOVE, b"keep.txt"), Change(Op.ADD, b"caf\xe9", NO_META)
        )
        events = await stream.events(4)
    assert [(e.event, e.id) for e in events] == [
        ("add", start + 1),
        ("modify", start + 2),
        ("remove", start + 3),
        ("add", start + 4),
    ]
    assert [e.data for e in events] == [
        entry("new.txt", "node-a", 3, MTIME_TEXT) | {"version": start + 1},
        entry("new.txt", "node-a", 9, "2023-11-14T22:13:25.123456Z") | {"version": start + 2},
        entry("keep.txt", "node-a", 1, MTIME_TEXT) | {"version": start + 3},
        # size and modified unknown (a legacy watcher's file); the byte 0xE9 as \udce9
        entry("caf\udce9", "node-a", None, None) | {"version": start + 4},
    ]


async def test_an_event_carries_the_entry_exactly_as_detail_lists_it(gateway: Gateway) -> None:
    names = [b"caf\xe9.txt", 'quote " and \\ and 😀'.encode(), b"plain.txt"]
    async with gateway.stream() as stream:
        await stream.next()
        gateway.install("node-a", {name: meta() for name in names})
        async with asyncio.timeout(TIMEOUT):
            raw = await stream.response.content.read(1)
            while raw.count(b"\n\n") < 3:
                raw += await stream.response.content.read(1)
    _, _, body = await gateway.get("/files/?detail=1")
    listed = body[body.index(b"[") + 1 : body.rindex(b"]")]  # the entries, as encoded
    for block in raw.split(b"\n\n")[:3]:
        data = block.split(b"\ndata: ")[1]
        version = parse(block).id
        assert version is not None
        assert data.endswith(b',"version":%d}' % version)
        assert data[: data.rindex(b',"version"')] + b"}" in listed  # the same bytes
    assert b"\\udce9" in raw


# ---------------------------------------------------------------- resuming


async def test_last_event_id_resumes_with_the_missed_events_and_no_list(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta()})
    async with gateway.stream() as stream:
        await stream.next()
        gateway.apply("node-a", 1, Change(Op.ADD, b"b.txt", meta()))
        seen = (await stream.next()).id
        assert seen is not None
    # Missed while away: two changes.
    gateway.apply("node-a", 2, Change(Op.ADD, b"c.txt", meta()))
    gateway.apply("node-a", 3, Change(Op.REMOVE, b"a.txt"))
    async with gateway.stream(**{"Last-Event-ID": str(seen)}) as stream:
        missed = await stream.events(2)
        assert [(e.event, e.id, e.data["filename"]) for e in missed] == [
            ("add", seen + 1, "c.txt"),
            ("remove", seen + 2, "a.txt"),
        ]
        gateway.apply("node-a", 4, Change(Op.ADD, b"d.txt", meta()))
        live = await stream.next()
        assert (live.event, live.id, live.data["filename"]) == ("add", seen + 3, "d.txt")


async def test_since_resumes_a_first_connect_from_the_listed_version(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta()})
    _, _, body = await gateway.get("/files/?detail=1")
    listed = json.loads(body)["version"]
    gateway.apply("node-a", 1, Change(Op.ADD, b"b.txt", meta()))  # after the list was read
    async with gateway.stream(f"?since={listed}") as stream:
        first = await stream.next()
        assert (first.event, first.id, first.data["filename"]) == ("add", listed + 1, "b.txt")
    # A reconnecting EventSource keeps ?since= in its URL and sends Last-Event-ID: the header wins.
    gateway.apply("node-a", 2, Change(Op.ADD, b"c.txt", meta()))
    async with gateway.stream(f"?since={listed}", **{"Last-Event-ID": str(listed + 1)}) as stream:
        first = await stream.next()
        assert (first.event, first.id, first.data["filename"]) == ("add", listed + 2, "c.txt")


async def test_resuming_at_the_current_version_sends_only_live_events(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta()})
    async with gateway.stream(f"?since={gateway.version}") as stream:
        gateway.apply("node-a", 1, Change(Op.ADD, b"b.txt", meta()))
        first = await stream.next()
        assert (first.event, first.id) == ("add", gateway.version)


async def test_a_resume_point_the_history_no_longer_reaches_gets_a_reset(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(history=3)
    old = gateway.version
    gateway.install("node-a", {b"f%d.txt" % i: meta() for i in range(10)})
    current = gateway.version
    for query, headers, since in (
        (f"?since={old}", {}, old),
        ("", {"Last-Event-ID": str(old + 1)}, old + 1),
    ):
        async with gateway.stream(query, **headers) as stream:
            first = await stream.next()
            reason = f"history no longer reaches version {since}"
            assert first == Sse("reset", current, {"version": current, "reason": reason})
    # A version this aggregator never reached (another process's, say): a reset too.
    async with gateway.stream(f"?since={current + 100}") as stream:
        first = await stream.next()
        assert (first.event, first.id) == ("reset", current)
        gateway.apply("node-a", 1, Change(Op.ADD, b"after.txt", meta()))
        live = await stream.next()
        assert (live.event, live.id, live.data["filename"]) == ("add", current + 1, "after.txt")


@pytest.mark.parametrize(
    ("query", "headers", "named"),
    [
        ("?since=abc", {}, "'since'"),
        ("?since=-1", {}, "'since'"),
        ("?since=1.5", {}, "'since'"),
        ("?since=", {}, "'since'"),
        ("?since=%D9%A3", {}, "'since'"),  # an Arabic-Indic digit is no version
        ("", {"Last-Event-ID": "x7"}, "Last-Event-ID"),
        ("", {"Last-Event-ID": "7 8"}, "Last-Event-ID"),
        ("?since=1", {"Last-Event-ID": "nope"}, "Last-Event-ID"),
        ("?since=x", {"Last-Event-ID": ""}, "'since'"),  # an empty id: none
        ("?since=-1", {"Last-Event-ID": "7"}, "'since'"),  # checked though the header wins
    ],
)
async def test_a_malformed_resume_point_is_a_400_problem_naming_it(
    gateway: Gateway, query: str, headers: dict[str, str], named: str
) -> None:
    status, response_headers, body = await gateway.get(f"/files/events{query}", **headers)
    assert status == 400
    assert response_headers["Content-Type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["status"] == 400
    assert named in problem["detail"]
    assert "non-negative integer" in problem["detail"]


# ---------------------------------------------------------------- keep-alive, limits


async def test_an_idle_stream_gets_a_keep_alive_comment(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(keepalive=0.05)
    async with gateway.stream() as stream:
        assert (await stream.next()).event == "version"
        assert (await stream.next()).comment == "keep-alive"
        assert (await stream.next()).comment == "keep-alive"
        gateway.install("node-a", {b"a.txt": meta()})
        assert (await stream.events(1))[0].event == "add"


async def test_the_client_limit_answers_429_and_frees_a_place_when_one_leaves(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(max_clients=2)
    async with gateway.stream() as one, gateway.stream() as two:
        await one.next()
        await two.next()
        status, headers, body = await gateway.get("/files/events")
        assert status == 429
        assert headers["Content-Type"].startswith("application/problem+json")
        assert "--max-event-clients" in json.loads(body)["detail"]
        one.close()

        async def admitted() -> int:
            async with gateway.session.get(gateway.base + "/files/events") as resp:
                return resp.status

        assert await wait_for_async(admitted, TIMEOUT, until=lambda s: s == 200) == 200
        gateway.install("node-a", {b"a.txt": meta()})
        assert (await two.events(1))[0].event == "add"  # the others go on


@contextlib.asynccontextmanager
async def deaf_client(gateway: Gateway) -> AsyncIterator[socket.socket]:
    """A raw client that asks for the stream and reads nothing (a tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (HOST, int(gateway.base.rsplit(":", 1)[1])))
        await loop.sock_sendall(sock, b"GET /files/events HTTP/1.1\r\nHost: test\r\n\r\n")
        yield sock
    finally:
        sock.close()


async def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while chunk := await loop.sock_recv(sock, 1 << 20):
            data += chunk
    return bytes(data)


def clients_of(gateway: Gateway) -> Callable[[], Awaitable[int]]:
    """A probe of how many streams the gateway has open."""

    async def probe() -> int:
        return gateway.events.client_count

    return probe


@dataclass
class Flood:
    """Batches of long-named new files for node-a, each read whole by a reader that keeps up."""

    gateway: Gateway
    reader: Stream
    batch: int
    sequence: int = 0

    async def step(self) -> None:
        """Publish one batch and wait until the reader got all of it, in order."""
        gateway = self.gateway
        self.sequence += 1
        expected = gateway.version
        name = "x" * 200
        changes = (
            Change(Op.ADD, f"{self.sequence:06d}-{i:04d}-{name}".encode(), meta())
            for i in range(self.batch)
        )
        gateway.apply("node-a", self.sequence, *changes)
        for event in await self.reader.events(self.batch):
            expected += 1
            assert (event.event, event.id) == ("add", expected)

    async def until_dropped(self) -> None:
        """Flood until a client is dropped (20 s at most)."""

        async def probe() -> float:
            await self.step()
            return counter(self.gateway.metrics, "filewatch_event_clients_dropped_total")

        await wait_for_async(probe, 20, what="a client to be dropped", interval=0)


async def test_a_client_that_does_not_read_is_dropped_when_its_queue_fills(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(reader_queue=250, write_timeout=10)
    gateway.install("node-a", {})
    async with gateway.stream() as reader, deaf_client(gateway) as deaf:
        await reader.next()
        await wait_for_async(clients_of(gateway), TIMEOUT, until=lambda n: n == 2)
        flood = Flood(gateway, reader, batch=200)
        await flood.until_dropped()
        # The deaf client reads at last: what was sent, then `dropped`, then the end.
        tail = await read_to_end(deaf)
        at = tail.rindex(b"event: dropped\n")
        end = tail.index(b"\n\n", at)
        dropped = parse(tail[at:end])
        assert dropped.id is None
        assert "queue" in dropped.data["reason"]
        assert tail[end + 2 :] == b"\r\n0\r\n\r\n"  # then the chunked body's end
        assert gateway.events.client_count == 1
        await flood.step()  # the reader goes on
    assert counter(gateway.metrics, "filewatch_event_clients_dropped_total") == 1
    assert counter(gateway.metrics, "filewatch_watch_readers_dropped_total") == 0


async def test_a_write_that_waits_the_write_timeout_drops_the_client(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(reader_queue=1_000_000, write_timeout=0.3)
    gateway.install("node-a", {})
    async with gateway.stream() as reader, deaf_client(gateway) as deaf:
        await reader.next()
        await wait_for_async(clients_of(gateway), TIMEOUT, until=lambda n: n == 2)
        flood = Flood(gateway, reader, batch=200)
        await flood.until_dropped()
        # Its farewell is not read either: the stream is cut within the write timeout.
        await wait_for_async(clients_of(gateway), TIMEOUT, until=lambda n: n == 1)
        with contextlib.suppress(ConnectionError):
            await read_to_end(deaf)
        await flood.step()


# ---------------------------------------------------------------- shutdown


async def test_the_runner_cleanup_ends_every_stream_at_once(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(reader_queue=1_000_000, write_timeout=30)
    gateway.install("node-a", {})
    async with gateway.stream() as reader, deaf_client(gateway) as deaf:
        await reader.next()
        await wait_for_async(clients_of(gateway), TIMEOUT, until=lambda n: n == 2)
        flood = Flood(gateway, reader, batch=200)

        async def deaf_handler_blocked() -> int:
            await flood.step()
            return gateway.events.writing_count

        # The deaf client's handler waits in a write, for up to 30 s.
        await wait_for_async(deaf_handler_blocked, 20, until=lambda n: n == 1, interval=0)
        started = time.monotonic()
        await gateway.runner.cleanup()
        assert time.monotonic() - started < 2.0
        assert gateway.events.client_count == 0
        assert await reader.rest() == []  # the reader's stream ends cleanly
        with contextlib.suppress(ConnectionError):
            await read_to_end(deaf)


async def test_aggregator_stop_ends_event_streams_promptly() -> None:
    config = replace(BASE_CONFIG, grace=5.0)
    aggregator = Aggregator(config)
    await aggregator.start()
    stopped = False
    try:
        base = f"http://{HOST}:{aggregator.http_ports[0]}"
        async with aiohttp.ClientSession() as session:
            streams = [await session.get(base + "/files/events") for _ in range(3)]
            for response in streams:
                assert parse((await response.content.readuntil(b"\n\n"))[:-2]).event == "version"
            started = time.monotonic()
            await aggregator.stop()
            stopped = True
            assert time.monotonic() - started < 2.0  # not the 5 s grace, nor aiohttp's 60 s
            for response in streams:
                async with asyncio.timeout(TIMEOUT):
                    assert await response.content.read() == b""  # ended, nothing more
                response.release()
    finally:
        if not stopped:
            await aggregator.stop()


# ---------------------------------------------------------------- the same events as WatchFiles


async def test_the_stream_carries_the_events_watch_files_streams() -> None:
    aggregator = Aggregator(BASE_CONFIG)
    await aggregator.start()
    try:
        async with open_channel(aggregator) as channel, aiohttp.ClientSession() as session:
            peer = Peer(channel, "node-a")
            await peer.join([b"a.txt"])
            watch = filewatch_pb2_grpc.FileIndexStub(channel).WatchFiles(pb.WatchFilesRequest())
            while not (await asyncio.wait_for(watch.read(), TIMEOUT)).list.done:
                pass
            url = f"http://{HOST}:{aggregator.http_ports[0]}/files/events"
            async with session.get(url) as response:
                stream = Stream(response)
                await stream.next()
                await peer.batch(1, add(b"b.txt", 5), modify(b"a.txt", 7))
                await peer.batch(2, remove(b"b.txt"))
                sse = await stream.events(3)
            kinds = {pb.FileEvent.KIND_ADDED: "add", pb.FileEvent.KIND_MODIFIED: "modify"}
            kinds[pb.FileEvent.KIND_REMOVED] = "remove"
            grpc_events = []
            for _ in range(3):
                message = await asyncio.wait_for(watch.read(), TIMEOUT)
                ev = message.event
                grpc_events.append((kinds[ev.kind], ev.version, ev.entry.filename, ev.entry.size))
            watch.cancel()
            assert [(e.event, e.id, e.data["filename"], e.data["size"]) for e in sse] == (
                grpc_events
            )
            assert [e.id for e in sse] == [e.data["version"] for e in sse]
    finally:
        await aggregator.stop()
