"""The aggregator's gRPC side over real sockets (SPEC 4.2, 6, 7, 10).

Every test starts a real `Aggregator` on 127.0.0.1 port 0 in this event loop
and talks to it with raw grpc.aio clients: the `Sync` stream is driven message
by message, as a watcher would, and the result is read back through
`FileIndex`. Waits are bounded polls, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aggregator.app import Aggregator
from aggregator.config import AggregatorConfig
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc
from tests.support import wait_for_async

HOST = "127.0.0.1"
BASE_CONFIG = AggregatorConfig(http=(f"{HOST}:0",), grpc=f"{HOST}:0", ttl=1.0, grace=1.0)
TIMEOUT = 5.0
"""Bound on any single expected answer from the aggregator."""
POLL = 0.01
MTIME_NS = 1_700_000_000_123_456_000
MTIME_TEXT = "2023-11-14T22:13:20.123456Z"

T = TypeVar("T")


# ---------------------------------------------------------------- fixtures


class AggregatorFactory(Protocol):
    """Starts an aggregator with `BASE_CONFIG` changed by `overrides`."""

    async def __call__(self, **overrides: Any) -> Aggregator: ...


@pytest.fixture
async def make_aggregator() -> AsyncIterator[AggregatorFactory]:
    """Aggregators started by the test, stopped last-started first."""
    started: list[Aggregator] = []

    async def factory(**overrides: Any) -> Aggregator:
        aggregator = Aggregator(replace(BASE_CONFIG, **overrides))
        started.append(aggregator)
        await aggregator.start()
        return aggregator

    try:
        yield factory
    finally:
        for aggregator in reversed(started):
            await aggregator.stop()


@pytest.fixture
async def aggregator(make_aggregator: AggregatorFactory) -> Aggregator:
    """An aggregator with the base config (TTL 1 s)."""
    return await make_aggregator()


@contextlib.asynccontextmanager
async def open_channel(aggregator: Aggregator) -> AsyncIterator[Any]:
    """A grpc.aio channel to the aggregator, closed (cancelling its calls) on exit."""
    async with grpc.aio.insecure_channel(f"{HOST}:{aggregator.grpc_port}") as channel:
        yield channel


@pytest.fixture
async def channel(aggregator: Aggregator) -> AsyncIterator[Any]:
    """A channel to the `aggregator` fixture."""
    async with open_channel(aggregator) as ch:
        yield ch


# ---------------------------------------------------------------- helpers


def info(name: bytes, size: int = 1, mtime_ns: int = MTIME_NS) -> pb.FileInfo:
    """A FileInfo with defaults."""
    return pb.FileInfo(name=name, size=size, mtime_ns=mtime_ns)


def add(name: bytes, size: int = 1) -> pb.Change:
    """An OP_ADD change."""
    return pb.Change(op=pb.OP_ADD, file=info(name, size))


def modify(name: bytes, size: int) -> pb.Change:
    """An OP_MODIFY change."""
    return pb.Change(op=pb.OP_MODIFY, file=info(name, size))


def remove(name: bytes) -> pb.Change:
    """An OP_REMOVE change."""
    return pb.Change(op=pb.OP_REMOVE, file=pb.FileInfo(name=name))


class Peer:
    """One raw `Sync` stream, driven message by message as a watcher would."""

    def __init__(
        self,
        channel: Any,
        node: str,
        epoch: str = "epoch-1",
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.node = node
        self.epoch = epoch
        self.call: Any = filewatch_pb2_grpc.WatcherSyncStub(channel).Sync(
            metadata=tuple(metadata) if metadata else None
        )

    async def send(self, message: pb.WatcherMessage) -> None:
        """Write one message."""
        await asyncio.wait_for(self.call.write(message), TIMEOUT)

    async def receive(self) -> pb.AggregatorMessage:
        """The next message from the aggregator (fails on the end of the stream)."""
        message = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert message is not grpc.aio.EOF, "the aggregator ended the stream"
        assert isinstance(message, pb.AggregatorMessage)
        return message

    async def hello(self, last_sequence: int = 0) -> pb.Welcome:
        """Say hello; returns the Welcome."""
        hello = pb.Hello(
            node=self.node,
            epoch=self.epoch,
            folder="/srv/folder",
            host="watcher-host",
            http_port=4000,
            last_sequence=last_sequence,
        )
        await self.send(pb.WatcherMessage(hello=hello))
        message = await self.receive()
        assert message.WhichOneof("kind") == "welcome", message
        return message.welcome

    async def snapshot_chunks(self, files: Sequence[pb.FileInfo], chunk: int = 2) -> None:
        """Send `files` as snapshot chunks of `chunk` files, without the end marker."""
        for start in range(0, len(files), chunk):
            part = pb.SnapshotChunk(files=files[start : start + chunk])
            await self.send(pb.WatcherMessage(snapshot_chunk=part))

    async def snapshot(
        self, names: Sequence[bytes], sequence: int = 0, chunk: int = 2
    ) -> pb.AggregatorMessage:
        """Send a whole snapshot of `names`; returns the aggregator's answer."""
        await self.snapshot_chunks([info(n) for n in names], chunk)
        end = pb.SnapshotEnd(sequence=sequence, count=len(names))
        await self.send(pb.WatcherMessage(snapshot_end=end))
        return await self.receive()

    async def batch(self, sequence: int, *changes: pb.Change, observed_ns: int = 0) -> None:
        """Send one batch (no answer is expected unless it opens a gap)."""
        message = pb.Batch(sequence=sequence, changes=changes, observed_unix_ns=observed_ns)
        await self.send(pb.WatcherMessage(batch=message))

    async def heartbeat(self, sequence: int = 0) -> pb.AggregatorMessage:
        """Send a heartbeat; returns the next message from the aggregator.

        A heartbeat at or below the applied sequence is always answered, after
        everything sent before it was handled, so it doubles as a barrier.
        """
        await self.send(pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=sequence)))
        return await self.receive()

    async def status(self) -> Any:
        """The final status code of the stream (unread messages are drained)."""
        return await final_status(self.call)

    async def join(self, names: Sequence[bytes] = (), sequence: int = 0, chunk: int = 2) -> None:
        """Hello, then a snapshot, checking the Welcome and the Ack."""
        welcome = await self.hello(sequence)
        assert not welcome.resume
        answer = await self.snapshot(names, sequence, chunk)
        assert answer.WhichOneof("kind") == "ack", answer
        assert answer.ack.applied_sequence == sequence


async def final_status(call: Any) -> Any:
    """The final status code of a call, once its unread messages are drained.

    gRPC delivers the status only after every message before it was read.
    """

    async def drain() -> Any:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
        return await call.code()

    return await asyncio.wait_for(drain(), TIMEOUT)


async def list_files(channel: Any, page_size: int = 0) -> pb.ListFilesResponse:
    """One ListFiles call."""
    stub = filewatch_pb2_grpc.FileIndexStub(channel)
    response = await asyncio.wait_for(
        stub.ListFiles(pb.ListFilesRequest(page_size=page_size)), TIMEOUT
    )
    assert isinstance(response, pb.ListFilesResponse)
    return response


async def listed(channel: Any) -> list[tuple[bytes, str]]:
    """Every (raw name, node) the aggregator lists, in its order."""
    return [(f.raw_name, f.node) for f in (await list_files(channel)).files]


async def names_of(channel: Any, node: str) -> list[bytes]:
    """The raw names listed for one node, in order."""
    return [raw for raw, n in await listed(channel) if n == node]


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout: float = TIMEOUT,
    what: str = "the condition",
) -> T:
    """Poll `probe` until `until(value)` holds; fail after `timeout` seconds."""
    return await wait_for_async(probe, timeout, until=until, what=what, interval=POLL)


async def poll(
    condition: Callable[[], bool], *, timeout: float = TIMEOUT, what: str = "the condition"
) -> None:
    """Poll a synchronous condition until it holds; fail after `timeout` seconds."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, bool, timeout=timeout, what=what)


def sample(aggregator: Aggregator, name: str, **labels: str) -> float:
    """One sample of the aggregator's metrics (0 when absent)."""
    value = aggregator.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def total(aggregator: Aggregator, name: str) -> float:
    """The sum of every sample called `name`, whatever its labels."""
    return sum(
        s.value
        for metric in aggregator.metrics.registry.collect()
        for s in metric.samples
        if s.name == name
    )


async def expect_rpc_error(awaitable: Awaitable[Any]) -> Any:
    """The status code of the AioRpcError the awaitable must raise."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(awaitable, TIMEOUT)
    return caught.value.code()


# ---------------------------------------------------------------- Sync: the happy path


async def test_hello_from_an_unknown_node_asks_for_a_snapshot(channel: Any) -> None:
    peer = Peer(channel, "node-a")
    welcome = await peer.hello(last_sequence=7)
    assert not welcome.resume
    assert welcome.applied_sequence == 0
    assert welcome.epoch == ""
    peer.call.cancel()


async def test_snapshot_in_chunks_is_swapped_in_at_its_end(
    aggregator: Aggregator, channel: Any
) -> None:
    peer = Peer(channel, "node-a")
    await peer.hello()
    names = [b"e.txt", b"c.txt", b"a.txt", b"d.txt", b"b.txt"]
    await peer.snapshot_chunks([info(n, size=len(n) * 10) for n in names], chunk=2)
    # Built aside: nothing is visible before the end marker.
    beat = await peer.heartbeat()
    assert beat.WhichOneof("kind") == "ack"
    assert await listed(channel) == []

    end = pb.SnapshotEnd(sequence=4, count=len(names))
    await peer.send(pb.WatcherMessage(snapshot_end=end))
    answer = await peer.receive()
    assert answer.WhichOneof("kind") == "ack"
    assert answer.ack.applied_sequence == 4

    response = await list_files(channel)
    assert [f.raw_name for f in response.files] == sorted(names)
    assert [f.filename for f in response.files] == [n.decode() for n in sorted(names)]
    assert response.count == 5
    assert response.version == aggregator.store.index.version > 0
    assert response.next_page_token == ""
    first = response.files[0]
    assert (first.node, first.size, first.modified_unix_ns) == ("node-a", 50, MTIME_NS)
    assert first.modified == MTIME_TEXT
    peer.call.cancel()


async def test_empty_snapshot_is_acked_and_lists_nothing(channel: Any) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([], sequence=3)
    assert await listed(channel) == []
    peer.call.cancel()


async def test_batches_apply_in_order_and_a_duplicate_is_ignored(
    aggregator: Aggregator, channel: Any
) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([b"keep.txt", b"old.txt"])
    await peer.batch(1, add(b"new.txt", size=1))
    await peer.batch(2, modify(b"new.txt", size=2), remove(b"old.txt"))
    await peer.batch(3, add(b"z.txt"), remove(b"z.txt"), add(b"last.txt"))
    beat = await peer.heartbeat()
    assert beat.WhichOneof("kind") == "ack"
    assert beat.ack.applied_sequence == 3
    response = await list_files(channel)
    assert [(f.raw_name, f.size) for f in response.files] == [
        (b"keep.txt", 1),
        (b"last.txt", 1),
        (b"new.txt", 2),
    ]
    version = response.version

    # Sequence 2 again, with other content: ignored, nothing changes.
    duplicates = sample(aggregator, "filewatch_duplicate_batches_total")
    await peer.batch(2, add(b"ghost.txt"), remove(b"keep.txt"))
    beat = await peer.heartbeat()
    assert beat.ack.applied_sequence == 3
    again = await list_files(channel)
    assert list(again.files) == list(response.files)
    assert again.version == version
    assert sample(aggregator, "filewatch_duplicate_batches_total") == duplicates + 1

    # The next sequence still applies.
    await peer.batch(4, remove(b"keep.txt"))
    assert (await peer.heartbeat()).ack.applied_sequence == 4
    assert await names_of(channel, "node-a") == [b"last.txt", b"new.txt"]
    peer.call.cancel()


async def test_a_gap_asks_for_a_resync_and_nothing_applies_until_the_snapshot(
    channel: Any,
) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt"])
    await peer.batch(1, add(b"b.txt"))
    await peer.batch(3, add(b"after-gap.txt"))
    answer = await peer.receive()
    assert answer.WhichOneof("kind") == "resync"
    assert answer.resync.reason == "gap"
    assert answer.resync.applied_sequence == 1

    # Batches in flight before the snapshot (even the missing one) are not applied.
    await peer.batch(2, add(b"late.txt"))
    await peer.batch(4, add(b"later.txt"))
    beat = await peer.heartbeat()
    assert beat.WhichOneof("kind") == "ack"
    assert beat.ack.applied_sequence == 1
    assert await names_of(channel, "node-a") == [b"a.txt", b"b.txt"]

    # The snapshot replaces the list; batches apply again after it.
    answer = await peer.snapshot([b"a.txt", b"after-gap.txt", b"late.txt"], sequence=4)
    assert answer.WhichOneof("kind") == "ack"
    assert answer.ack.applied_sequence == 4
    assert await names_of(channel, "node-a") == [b"a.txt", b"after-gap.txt", b"late.txt"]
    await peer.batch(5, remove(b"a.txt"))
    assert (await peer.heartbeat()).ack.applied_sequence == 5
    assert await names_of(channel, "node-a") == [b"after-gap.txt", b"late.txt"]
    peer.call.cancel()


async def test_a_reconnect_in_the_same_epoch_resumes_from_the_applied_sequence(
    aggregator: Aggregator, channel: Any
) -> None:
    first = Peer(channel, "node-a", epoch="e1")
    await first.join([b"a.txt"])
    await first.batch(1, add(b"b.txt"))
    await first.batch(2, add(b"c.txt"))
    assert (await first.heartbeat()).ack.applied_sequence == 2
    first.call.cancel()  # the network broke
    await poll(lambda: aggregator.sync.stream_count == 0, what="the first stream to end")

    second = Peer(channel, "node-a", epoch="e1")
    welcome = await second.hello(last_sequence=4)
    assert welcome.resume
    assert welcome.applied_sequence == 2
    assert welcome.epoch == "e1"
    # The watcher resends only what came after 2.
    await second.batch(3, add(b"d.txt"))
    await second.batch(4, remove(b"a.txt"))
    assert (await second.heartbeat()).ack.applied_sequence == 4
    assert await names_of(channel, "node-a") == [b"b.txt", b"c.txt", b"d.txt"]
    second.call.cancel()


async def test_a_new_stream_for_the_same_node_supersedes_the_old_one(channel: Any) -> None:
    old = Peer(channel, "node-a", epoch="e1")
    await old.join([b"a.txt"])
    new = Peer(channel, "node-a", epoch="e1")
    welcome = await new.hello()
    assert welcome.resume
    assert await old.status() == grpc.StatusCode.ABORTED
    # The node keeps its files: the new stream owns them now.
    assert await names_of(channel, "node-a") == [b"a.txt"]
    await new.batch(1, add(b"b.txt"))
    assert (await new.heartbeat()).ack.applied_sequence == 1
    assert await names_of(channel, "node-a") == [b"a.txt", b"b.txt"]
    new.call.cancel()


async def test_another_epoch_cannot_take_a_live_nodes_name(channel: Any) -> None:
    owner = Peer(channel, "node-a", epoch="e1")
    await owner.join([b"a.txt"])
    impostor = Peer(channel, "node-a", epoch="e2")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await impostor.hello()
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The owner's stream and files are untouched.
    assert await names_of(channel, "node-a") == [b"a.txt"]
    await owner.batch(1, add(b"b.txt"))
    assert (await owner.heartbeat()).ack.applied_sequence == 1
    owner.call.cancel()


async def test_a_new_epoch_sends_a_snapshot_that_replaces_the_old_list(
    aggregator: Aggregator, channel: Any
) -> None:
    other = Peer(channel, "node-b")
    await other.join([b"b.txt"])
    old = Peer(channel, "node-a", epoch="e1")
    await old.join([b"a.txt", b"b.txt", b"c.txt"], sequence=0)
    await old.batch(1, add(b"x.txt"))
    assert (await old.heartbeat()).ack.applied_sequence == 1
    old.call.cancel()  # the watcher process was restarted
    await poll(lambda: aggregator.sync.stream_count == 1, what="the old stream to end")

    new = Peer(channel, "node-a", epoch="e2")
    welcome = await new.hello(last_sequence=0)
    assert not welcome.resume
    assert welcome.applied_sequence == 0
    # While the new snapshot streams in, the old list stays, with no duplicates.
    await new.snapshot_chunks([info(b"b.txt"), info(b"d.txt")])
    assert (await new.heartbeat()).WhichOneof("kind") == "ack"
    assert await names_of(channel, "node-a") == [b"a.txt", b"b.txt", b"c.txt", b"x.txt"]
    end = pb.SnapshotEnd(sequence=0, count=2)
    await new.send(pb.WatcherMessage(snapshot_end=end))
    assert (await new.receive()).WhichOneof("kind") == "ack"
    assert await listed(channel) == [
        (b"b.txt", "node-a"),
        (b"b.txt", "node-b"),
        (b"d.txt", "node-a"),
    ]
    # The new epoch counts from its own sequence.
    await new.batch(1, add(b"e.txt"))
    assert (await new.heartbeat()).ack.applied_sequence == 1
    assert await names_of(channel, "node-a") == [b"b.txt", b"d.txt", b"e.txt"]
    new.call.cancel()
    other.call.cancel()


# ---------------------------------------------------------------- Sync: leaving


async def test_goodbye_removes_the_files_at_once(aggregator: Aggregator, channel: Any) -> None:
    stays = Peer(channel, "node-b")
    await stays.join([b"b.txt"])
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt", b"c.txt"])
    await peer.send(pb.WatcherMessage(goodbye=pb.Goodbye()))
    assert await peer.status() == grpc.StatusCode.OK
    assert await listed(channel) == [(b"b.txt", "node-b")]
    assert aggregator.store.index.watcher("node-a") is None
    stays.call.cancel()


async def test_a_clean_half_close_removes_the_files_at_once(
    aggregator: Aggregator, channel: Any
) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt", b"c.txt"])
    await peer.call.done_writing()
    assert await peer.status() == grpc.StatusCode.OK
    assert await listed(channel) == []
    assert aggregator.store.index.watcher("node-a") is None


async def test_a_broken_stream_keeps_the_files_for_the_ttl(
    aggregator: Aggregator, channel: Any
) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt", b"b.txt"])
    peer.call.cancel()
    await poll(lambda: aggregator.sync.stream_count == 0, what="the stream to end")
    ended = time.monotonic()
    assert await names_of(channel, "node-a") == [b"a.txt", b"b.txt"]

    await eventually(
        lambda: listed(channel), lambda files: files == [], timeout=5.0, what="the TTL to expire"
    )
    kept = time.monotonic() - ended
    assert kept >= aggregator.config.ttl * 0.9, f"files removed after {kept:.2f} s"


async def test_a_cancelled_stream_is_never_taken_for_a_clean_close(
    aggregator: Aggregator, channel: Any
) -> None:
    # grpc.aio may read a cancelled (or broken) call as EOF, like a half-close;
    # the files must stay for the TTL every time, not just most of the time.
    for attempt in range(25):
        peer = Peer(channel, "node-a")
        if attempt == 0:
            await peer.join([b"a.txt"])
        else:
            assert (await peer.hello()).resume, f"files lost before attempt {attempt}"
            assert (await peer.heartbeat()).WhichOneof("kind") == "ack"
        peer.call.cancel()
        await poll(lambda: aggregator.sync.stream_count == 0, what="the stream to end")
        assert aggregator.store.index.watcher("node-a") is not None, f"attempt {attempt}"
        assert await names_of(channel, "node-a") == [b"a.txt"], f"attempt {attempt}"


async def test_a_reconnect_within_the_ttl_keeps_the_files(
    aggregator: Aggregator, channel: Any
) -> None:
    first = Peer(channel, "node-a")
    await first.join([b"a.txt"])
    first.call.cancel()
    await poll(lambda: aggregator.sync.stream_count == 0, what="the stream to end")
    second = Peer(channel, "node-a")
    assert (await second.hello()).resume
    # Well past the TTL of the broken stream, the reconnected node keeps its files.
    waited = time.monotonic()
    while time.monotonic() - waited < aggregator.config.ttl * 1.5:
        assert await names_of(channel, "node-a") == [b"a.txt"]
        await second.heartbeat(0)  # alive, as an idle watcher is
        await asyncio.sleep(0.05)
    second.call.cancel()


async def test_stop_ends_open_streams_with_unavailable_even_before_a_hello(
    make_aggregator: AggregatorFactory,
) -> None:
    aggregator = await make_aggregator()
    async with open_channel(aggregator) as channel:
        idle = Peer(channel, "node-a")
        await idle.join([b"a.txt"])  # waits in a read, as an idle watcher's stream does
        silent = Peer(channel, "node-b")  # has not even said hello
        await poll(lambda: aggregator.sync.stream_count == 2, what="both streams to open")
        await asyncio.wait_for(aggregator.stop(), TIMEOUT)
        assert await idle.status() == grpc.StatusCode.UNAVAILABLE
        assert await silent.status() == grpc.StatusCode.UNAVAILABLE
    assert aggregator.sync.stream_count == 0
    # Shutdown is not a goodbye: the node's files were not removed.
    assert aggregator.store.index.watcher("node-a") is not None


async def test_a_stream_without_a_hello_ends_after_the_hello_timeout(
    make_aggregator: AggregatorFactory,
) -> None:
    aggregator = await make_aggregator(hello_timeout=0.2)
    async with open_channel(aggregator) as channel:
        silent = Peer(channel, "node-a")
        assert await silent.status() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello" in (await silent.call.details())
        # A stream that said hello in time is not bound by it.
        peer = Peer(channel, "node-b")
        await peer.join([b"b.txt"])
        # Let twice the hello timeout pass: the check is that nothing happens,
        # so there is no condition to poll for.
        await asyncio.sleep(0.4)
        assert (await peer.heartbeat()).WhichOneof("kind") == "ack"
        peer.call.cancel()


async def test_heartbeats_set_the_position_gauges_again_after_a_rejoin(
    aggregator: Aggregator, channel: Any
) -> None:
    last_seen = "filewatch_watcher_last_seen_timestamp_seconds"
    behind = "filewatch_watcher_sequence_behind"
    for round_ in range(2):
        peer = Peer(channel, "node-a")
        await peer.join([b"a.txt"], sequence=3)
        before = time.time()
        assert (await peer.heartbeat(sequence=3)).WhichOneof("kind") == "ack"
        assert sample(aggregator, last_seen, node="node-a") >= before - 1, f"round {round_}"
        assert sample(aggregator, behind, node="node-a") == 0
        await peer.send(pb.WatcherMessage(goodbye=pb.Goodbye()))
        assert await peer.status() == grpc.StatusCode.OK
        # A watcher that left has no series left behind.
        assert aggregator.metrics.registry.get_sample_value(last_seen, {"node": "node-a"}) is None


# ---------------------------------------------------------------- Sync: bad input


def _hello(node: str = "intruder", epoch: str = "e1") -> pb.WatcherMessage:
    return pb.WatcherMessage(hello=pb.Hello(node=node, epoch=epoch))


def _chunk(*names: bytes) -> pb.WatcherMessage:
    return pb.WatcherMessage(snapshot_chunk=pb.SnapshotChunk(files=[info(n) for n in names]))


def _end(count: int, sequence: int = 0) -> pb.WatcherMessage:
    return pb.WatcherMessage(snapshot_end=pb.SnapshotEnd(sequence=sequence, count=count))


def _batch(sequence: int, *changes: pb.Change) -> pb.WatcherMessage:
    return pb.WatcherMessage(batch=pb.Batch(sequence=sequence, changes=changes))


# The offending message is always the last one sent: a client that writes
# after the server has ended the call gets a local INTERNAL status instead.
BAD_STREAMS: dict[str, list[pb.WatcherMessage]] = {
    "first message not a hello": [pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=0))],
    "first message a snapshot chunk": [_chunk(b"sneaky.txt")],
    "empty message": [_hello(), pb.WatcherMessage()],
    "empty node": [_hello(node="")],
    "empty epoch": [_hello(epoch="")],
    "node too long": [_hello(node="n" * 1000)],
    "second hello": [_hello(), _hello()],
    "unknown op": [
        _hello(),
        _chunk(),
        _end(0),
        _batch(1, add(b"ok.txt"), pb.Change(op=7, file=info(b"bad.txt"))),  # type: ignore[arg-type]
    ],
    "unspecified op": [
        _hello(),
        _end(0),
        _batch(1, add(b"ok.txt"), pb.Change(op=pb.OP_UNSPECIFIED, file=info(b"bad.txt"))),
    ],
    "slash in a batch": [_hello(), _end(0), _batch(1, add(b"ok.txt"), add(b"sub/x.txt"))],
    "NUL in a batch": [_hello(), _end(0), _batch(1, add(b"ok.txt"), add(b"x\x00.txt"))],
    "empty name in a batch": [_hello(), _end(0), _batch(1, add(b"ok.txt"), add(b""))],
    "dot-dot in a batch": [_hello(), _end(0), _batch(1, add(b"ok.txt"), add(b".."))],
    "slash in a snapshot": [_hello(), _chunk(b"ok.txt", b"a/b")],
    "NUL in a snapshot": [_hello(), _chunk(b"ok.txt"), _chunk(b"a\x00b")],
    "snapshot count too high": [_hello(), _chunk(b"ok.txt", b"ok2.txt"), _end(3)],
    "snapshot count too low": [_hello(), _chunk(b"ok.txt", b"ok2.txt"), _end(1)],
    "batch inside a snapshot": [_hello(), _chunk(b"ok.txt"), _batch(1, add(b"x.txt"))],
}


@pytest.mark.parametrize("messages", BAD_STREAMS.values(), ids=BAD_STREAMS.keys())
async def test_bad_input_is_refused_and_changes_nothing(
    aggregator: Aggregator, channel: Any, messages: list[pb.WatcherMessage]
) -> None:
    keeper = Peer(channel, "keeper")
    await keeper.join([b"a.txt", b"z.txt"])
    before = await list_files(channel)
    errors_before = total(aggregator, "filewatch_ingestion_errors_total")

    call = filewatch_pb2_grpc.WatcherSyncStub(channel).Sync()
    for message in messages:
        await asyncio.wait_for(call.write(message), TIMEOUT)
    assert await final_status(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert await call.details()

    after = await list_files(channel)
    assert list(after.files) == list(before.files)
    assert after.version == before.version
    errors_after = total(aggregator, "filewatch_ingestion_errors_total")
    assert errors_after == errors_before + 1
    # The well-behaved stream is unaffected.
    await keeper.batch(1, add(b"m.txt"))
    assert (await keeper.heartbeat()).ack.applied_sequence == 1
    keeper.call.cancel()


async def test_a_bad_resnapshot_keeps_the_previous_list(channel: Any) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt", b"b.txt"])
    await peer.snapshot_chunks([info(b"c.txt")])
    await peer.send(_end(count=2))
    assert await peer.status() == grpc.StatusCode.INVALID_ARGUMENT
    assert await names_of(channel, "node-a") == [b"a.txt", b"b.txt"]


async def test_max_watchers_refuses_one_more_node(make_aggregator: AggregatorFactory) -> None:
    aggregator = await make_aggregator(max_watchers=1)
    async with open_channel(aggregator) as channel:
        first = Peer(channel, "node-a")
        await first.join([b"a.txt"])
        second = Peer(channel, "node-b")
        await second.send(_hello("node-b"))
        assert await second.status() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await listed(channel) == [(b"a.txt", "node-a")]
        # The node already held may reconnect; after it leaves, another may come.
        again = Peer(channel, "node-a")
        assert (await again.hello()).resume
        await again.send(pb.WatcherMessage(goodbye=pb.Goodbye()))
        assert await again.status() == grpc.StatusCode.OK
        third = Peer(channel, "node-c")
        await third.join([b"c.txt"])
        assert await listed(channel) == [(b"c.txt", "node-c")]
        third.call.cancel()


async def test_max_watchers_counts_nodes_still_sending_their_first_snapshot(
    make_aggregator: AggregatorFactory,
) -> None:
    aggregator = await make_aggregator(max_watchers=1)
    async with open_channel(aggregator) as channel:
        first = Peer(channel, "node-a")
        assert not (await first.hello()).resume
        # Neither has sent a snapshot yet: the second is one too many all the same.
        second = Peer(channel, "node-b")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await second.hello()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await first.snapshot([b"a.txt"])).WhichOneof("kind") == "ack"
        assert await listed(channel) == [(b"a.txt", "node-a")]
        assert aggregator.store.index.watcher_count == 1
        first.call.cancel()


async def test_token_guards_ingestion_but_not_reading(make_aggregator: AggregatorFactory) -> None:
    aggregator = await make_aggregator(token="t")  # noqa: S106 (a test token)
    async with open_channel(aggregator) as channel:
        anonymous = Peer(channel, "node-a")
        await anonymous.send(_hello("node-a"))
        assert await anonymous.status() == grpc.StatusCode.UNAUTHENTICATED

        wrong = Peer(channel, "node-a", metadata=[("authorization", "Bearer nope")])
        await wrong.send(_hello("node-a"))
        assert await wrong.status() == grpc.StatusCode.UNAUTHENTICATED

        assert await listed(channel) == []

        good = Peer(channel, "node-a", metadata=[("authorization", "Bearer t")])
        await good.join([b"a.txt"])
        # The read API needs no token.
        assert await listed(channel) == [(b"a.txt", "node-a")]
        good.call.cancel()


# ---------------------------------------------------------------- ListFiles


async def test_list_files_pages_walk_everything_in_order(channel: Any) -> None:
    a, b = Peer(channel, "node-a"), Peer(channel, "node-b")
    await a.join(["😀.txt".encode(), b"B.txt", b"a.txt"])
    await b.join([b"a.txt", "é.txt".encode()])
    expected = [
        (b"B.txt", "node-a"),
        (b"a.txt", "node-a"),
        (b"a.txt", "node-b"),
        ("é.txt".encode(), "node-b"),
        ("😀.txt".encode(), "node-a"),
    ]
    assert await listed(channel) == expected

    stub = filewatch_pb2_grpc.FileIndexStub(channel)
    seen: list[tuple[bytes, str]] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListFiles(pb.ListFilesRequest(page_size=2, page_token=token))
        pages += 1
        assert len(page.files) == (2 if pages < 3 else 1)
        assert page.count == 5
        seen += [(f.raw_name, f.node) for f in page.files]
        token = page.next_page_token
        if not token:
            break
        assert pages < 10, "the page tokens never end"
    assert pages == 3
    assert seen == expected
    a.call.cancel()
    b.call.cancel()


@pytest.mark.parametrize("token", ["garbage!", "bm90IGpzb24", "WzEsMl0=", "e30="])
async def test_list_files_refuses_a_garbage_page_token(channel: Any, token: str) -> None:
    stub = filewatch_pb2_grpc.FileIndexStub(channel)
    code = await expect_rpc_error(stub.ListFiles(pb.ListFilesRequest(page_token=token)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- WatchFiles


async def read_stream(call: Any) -> pb.WatchFilesResponse:
    """The next WatchFiles message (fails on the end of the stream)."""
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert message is not grpc.aio.EOF, "the aggregator ended the stream"
    assert isinstance(message, pb.WatchFilesResponse)
    return message


async def test_watch_files_sends_the_list_then_each_change(
    aggregator: Aggregator, channel: Any
) -> None:
    peer = Peer(channel, "node-a")
    names = [b"f%05d" % i for i in range(1500)]
    await peer.join(names, chunk=500)
    version = aggregator.store.index.version

    call = filewatch_pb2_grpc.FileIndexStub(channel).WatchFiles(pb.WatchFilesRequest())
    listed_names: list[bytes] = []
    while True:
        message = await read_stream(call)
        assert message.WhichOneof("kind") == "list"
        assert message.list.version == version
        listed_names += [f.raw_name for f in message.list.files]
        if message.list.done:
            break
    assert listed_names == names

    await peer.batch(1, add(b"new.txt", size=3))
    await peer.batch(2, modify(b"new.txt", size=4), remove(b"f00000"))
    kinds = []
    versions = []
    for _ in range(3):
        message = await read_stream(call)
        assert message.WhichOneof("kind") == "event"
        kinds.append((message.event.kind, message.event.entry.raw_name, message.event.entry.size))
        versions.append(message.event.version)
    assert kinds == [
        (pb.FileEvent.KIND_ADDED, b"new.txt", 3),
        (pb.FileEvent.KIND_MODIFIED, b"new.txt", 4),
        (pb.FileEvent.KIND_REMOVED, b"f00000", 1),
    ]
    assert versions == [version + 1, version + 2, version + 3]
    assert message.event.entry.node == "node-a"
    call.cancel()
    peer.call.cancel()


async def test_watch_files_of_an_empty_index_sends_one_empty_done_chunk(channel: Any) -> None:
    call = filewatch_pb2_grpc.FileIndexStub(channel).WatchFiles(pb.WatchFilesRequest())
    message = await read_stream(call)
    assert message.WhichOneof("kind") == "list"
    assert list(message.list.files) == []
    assert message.list.done
    call.cancel()


async def test_watch_files_resumes_from_a_version(aggregator: Aggregator, channel: Any) -> None:
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt", b"b.txt"])
    current = aggregator.store.index.version
    stub = filewatch_pb2_grpc.FileIndexStub(channel)

    # At the current version: no list, only what happens later.
    now = stub.WatchFiles(pb.WatchFilesRequest(resume_version=current))
    # One version back: the missed event first.
    back = stub.WatchFiles(pb.WatchFilesRequest(resume_version=current - 1))
    missed = await read_stream(back)
    assert missed.WhichOneof("kind") == "event"
    assert missed.event.version == current

    await poll(lambda: aggregator.store.reader_count == 2, what="both readers to subscribe")
    await peer.batch(1, add(b"c.txt"))
    for call in (now, back):
        message = await read_stream(call)
        assert message.WhichOneof("kind") == "event"
        assert message.event.version == current + 1
        assert message.event.entry.raw_name == b"c.txt"
        call.cancel()
    peer.call.cancel()


async def test_a_reader_that_never_reads_is_dropped_and_others_keep_going(
    make_aggregator: AggregatorFactory,
) -> None:
    aggregator = await make_aggregator(reader_queue=10)
    async with open_channel(aggregator) as channel, open_channel(aggregator) as slow_channel:
        peer = Peer(channel, "node-a")
        await peer.join([])
        stub = filewatch_pb2_grpc.FileIndexStub(channel)
        fast = stub.WatchFiles(pb.WatchFilesRequest())
        slow = filewatch_pb2_grpc.FileIndexStub(slow_channel).WatchFiles(pb.WatchFilesRequest())
        assert (await read_stream(fast)).list.done
        assert (await read_stream(slow)).list.done
        await poll(lambda: aggregator.store.reader_count == 2, what="both readers")

        # Big events fill the slow reader's flow-control window quickly; then its
        # queue of 10 overflows. The fast reader reads every event meanwhile.
        filler = b"x" * 1000
        sequence = 0
        sent = 0
        while sample(aggregator, "filewatch_watch_readers_dropped_total") == 0:
            sequence += 1
            assert sequence <= 5_000, "the slow reader was never dropped"
            names = [b"%s-%06d" % (filler, sent + i) for i in range(4)]
            await peer.batch(sequence, *(add(n) for n in names))
            sent += len(names)
            for name in names:
                event = await read_stream(fast)
                assert event.event.entry.raw_name == name
        assert sent > 10
        # Dropped, it is still a reader until its call ends: its status waits
        # behind the messages it has not read.
        assert aggregator.store.reader_count == 2

        # The slow reader gets what was already on the wire, then RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            for _ in range(sent + 1):
                await read_stream(slow)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "slow" in (caught.value.details() or "")
        await poll(lambda: aggregator.store.reader_count == 1, what="the slow reader's end")

        # The fast one goes on.
        await peer.batch(sequence + 1, remove(b"%s-%06d" % (filler, 0)))
        event = await read_stream(fast)
        assert event.event.kind == pb.FileEvent.KIND_REMOVED
        fast.cancel()
        peer.call.cancel()


async def test_a_batch_larger_than_the_reader_queue_reaches_a_reader_that_keeps_up(
    make_aggregator: AggregatorFactory,
) -> None:
    aggregator = await make_aggregator(reader_queue=10)
    async with open_channel(aggregator) as channel:
        peer = Peer(channel, "node-a")
        await peer.join([])
        call = filewatch_pb2_grpc.FileIndexStub(channel).WatchFiles(pb.WatchFilesRequest())
        assert (await read_stream(call)).list.done
        await poll(lambda: aggregator.store.reader_count == 1, what="the reader")
        # One batch (or one snapshot) of more changes than the queue holds: the
        # reader has read everything before it, so it is not slow.
        names = [b"f%02d" % i for i in range(25)]
        await peer.batch(1, *(add(n) for n in names))
        received = [(await read_stream(call)).event.entry.raw_name for _ in names]
        assert received == names
        assert sample(aggregator, "filewatch_watch_readers_dropped_total") == 0
        call.cancel()
        peer.call.cancel()


async def every_entry(channel: Any) -> dict[tuple[bytes, str], tuple[int, int]]:
    """What ListFiles lists, every page walked: (raw name, node) -> (size, mtime)."""
    stub = filewatch_pb2_grpc.FileIndexStub(channel)
    out: dict[tuple[bytes, str], tuple[int, int]] = {}
    token = ""
    while True:
        request = pb.ListFilesRequest(page_size=10_000, page_token=token)
        response = await asyncio.wait_for(stub.ListFiles(request), TIMEOUT)
        out.update(((f.raw_name, f.node), (f.size, f.modified_unix_ns)) for f in response.files)
        token = response.next_page_token
        if not token:
            return out


async def test_a_slow_reader_of_a_changing_index_ends_with_exactly_the_index(
    aggregator: Aggregator, channel: Any
) -> None:
    """The list is sent page by page from the live index while it changes (SPEC 4.3).

    After each page it reads, the reader waits for a batch of adds, removes and
    modifies all over the key space, so behind and ahead of the page being
    sent. The list never shows an entry twice; the list then the events add up
    to exactly what ListFiles lists. Changes ahead of the list's position are
    shown by the list itself (the list is not a copy taken at the start), the
    others come as events.
    """
    rng = random.Random(7)
    space = 40_000
    names = [b"k%05d" % i for i in range(0, space, 2)]  # 20,000, with gaps for adds
    peer = Peer(channel, "node-a")
    await peer.join(names, chunk=5000)
    present = set(names)
    version = aggregator.store.index.version
    # No BDP probing: the reader's flow-control window stays at 64 KB, so the
    # aggregator is only a page or so ahead of what the reader has read.
    async with grpc.aio.insecure_channel(
        f"{HOST}:{aggregator.grpc_port}", options=[("grpc.http2.bdp_probe", 0)]
    ) as reader_channel:
        call = filewatch_pb2_grpc.FileIndexStub(reader_channel).WatchFiles(pb.WatchFilesRequest())
        view: dict[tuple[bytes, str], tuple[int, int]] = {}
        chunks = sequence = 0
        while True:
            message = await read_stream(call)
            assert message.WhichOneof("kind") == "list", message
            assert message.list.version == version  # the version the list starts from
            for f in message.list.files:
                key = (f.raw_name, f.node)
                assert key not in view, f"{key} listed twice"
                view[key] = (f.size, f.modified_unix_ns)
            chunks += 1
            if message.list.done:
                break
            changes = []
            for _ in range(20):
                name = b"k%05d" % rng.randrange(space)
                if name not in present:
                    changes.append(add(name, size=rng.randrange(2, 10_000)))
                    present.add(name)
                elif rng.random() < 0.5:
                    changes.append(remove(name))
                    present.discard(name)
                else:
                    changes.append(modify(name, size=rng.randrange(2, 10_000)))
            sequence += 1
            await peer.batch(sequence, *changes)
            assert (await peer.heartbeat(sequence)).ack.applied_sequence == sequence
        assert chunks > 10, "the list came in too few pages to change under it"
        during_list = aggregator.store.index.version - version
        # A last add, after the list: every event before it has been sent when it comes.
        await peer.batch(sequence + 1, add(b"zz-end"))
        delivered = 0
        last_version = version
        while True:
            message = await read_stream(call)
            assert message.WhichOneof("kind") == "event", message
            event = message.event
            assert event.version > last_version
            last_version = event.version
            key = (event.entry.raw_name, event.entry.node)
            if event.kind == pb.FileEvent.KIND_REMOVED:
                assert key in view, f"removal of {key}, which the reader does not hold"
                del view[key]
            else:
                assert (key in view) == (event.kind == pb.FileEvent.KIND_MODIFIED), event
                view[key] = (event.entry.size, event.entry.modified_unix_ns)
            if event.entry.raw_name == b"zz-end":
                break
            delivered += 1
        assert view == await every_entry(channel)
        assert 0 < delivered < during_list, (
            f"{delivered} of the {during_list} changes made during the list came as events: "
            "some should have been behind the list's position, some ahead of it"
        )
        call.cancel()
    peer.call.cancel()


# ---------------------------------------------------------------- health, reflection


async def test_health_is_serving_then_not_serving_on_stop(
    aggregator: Aggregator, channel: Any
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "filewatch.v1.FileIndex", "filewatch.v1.WatcherSync"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(aggregator.stop())
    second = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    await asyncio.wait_for(stopping, TIMEOUT)

    try:
        after = await asyncio.wait_for(
            stub.Check(health_pb2.HealthCheckRequest(service="")), TIMEOUT
        )
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    else:
        assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_and_describes_the_services(channel: Any) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listing = await asyncio.wait_for(call.read(), TIMEOUT)
    services = {s.name for s in listing.list_services_response.service}
    assert {
        "filewatch.v1.FileIndex",
        "filewatch.v1.WatcherSync",
        "grpc.health.v1.Health",
    } <= services

    await call.write(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="filewatch.v1.FileIndex")
    )
    described = await asyncio.wait_for(call.read(), TIMEOUT)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        (service.name, method.name)
        for file in files
        if file.package == "filewatch.v1"
        for service in file.service
        for method in service.method
    }
    assert {("FileIndex", "ListFiles"), ("FileIndex", "WatchFiles")} <= methods
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), TIMEOUT) == grpc.StatusCode.OK
