"""Helpers of the aggregator's gRPC tests: a real `Aggregator`, raw grpc.aio clients.

Every gRPC test starts a real `Aggregator` on 127.0.0.1 port 0 in its event
loop (the `make_aggregator`, `aggregator` and `channel` fixtures of this
folder's conftest) and talks to it with raw grpc.aio clients: `Peer` drives the
`Sync` stream message by message, as a watcher would, and `list_files` /
`listed` / `names_of` read the result back through `FileIndex`. Waits are
bounded polls (`eventually`, `poll`), never bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import pytest

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


class AggregatorFactory(Protocol):
    """Starts an aggregator with `BASE_CONFIG` changed by `overrides`."""

    async def __call__(self, **overrides: Any) -> Aggregator: ...


@contextlib.asynccontextmanager
async def open_channel(aggregator: Aggregator) -> AsyncIterator[Any]:
    """A grpc.aio channel to the aggregator, closed (cancelling its calls) on exit."""
    async with grpc.aio.insecure_channel(f"{HOST}:{aggregator.grpc_port}") as channel:
        yield channel


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
        """Send a heartbeat that asks for an Ack; returns the next message from the aggregator.

        Such a heartbeat at or below the applied sequence is always answered, after
        everything sent before it was handled, so it doubles as a barrier.
        """
        beat = pb.Heartbeat(sequence=sequence, want_ack=True)
        await self.send(pb.WatcherMessage(heartbeat=beat))
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
