"""Synthetic gRPC watchers: the Sync protocol spoken with the raw stubs, from the bench process.

hello -> Welcome -> SnapshotChunk(s) -> SnapshotEnd(sequence, count) -> Ack ->
Batch(sequence + 1, ...) ... ; Heartbeat(sequence) -> Ack. Messages are built
with the generated classes and serialized before the clock starts, so the
load generator costs as little as possible while it is measured.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import grpc

from bench.harness import BenchError
from gen import filewatch_pb2 as pb

SYNC_METHOD = "/filewatch.v1.WatcherSync/Sync"
CHUNK_BYTES = 1024 * 1024
# The watcher's own keepalive settings (watcher/client.py).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]

File = tuple[bytes, int, int]
"""(name, size, mtime_ns)"""


def synthetic_files(count: int, start: int = 0, prefix: bytes = b"") -> list[File]:
    """`count` distinct files of 20-byte names in scattered (not sorted) order, varied stats."""
    out = []
    for i in range(start, start + count):
        name = prefix + b"%08x-%07d.jpg" % ((i * 2654435761) & 0xFFFFFFFF, i)
        out.append((name, (i * 7919) % 10_000_000, 1_700_000_000_000_000_000 + i * 1_000_003))
    return out


def hello_msg(node: str, epoch: str, last_sequence: int = 0) -> bytes:
    """A serialized WatcherMessage(hello)."""
    hello = pb.Hello(
        node=node, epoch=epoch, folder=f"/synthetic/{node}", host="bench", http_port=1,
        last_sequence=last_sequence,
    )  # fmt: skip
    return pb.WatcherMessage(hello=hello).SerializeToString()


def snapshot_msgs(
    files: Sequence[File], sequence: int = 0, chunk_bytes: int = CHUNK_BYTES
) -> list[bytes]:
    """Serialized SnapshotChunk messages of about `chunk_bytes` each, then the SnapshotEnd."""
    out: list[bytes] = []
    part: list[pb.FileInfo] = []
    size = 0
    for name, fsize, mtime in files:
        part.append(pb.FileInfo(name=name, size=fsize, mtime_ns=mtime))
        size += len(name) + 20
        if size >= chunk_bytes:
            out.append(_chunk(part))
            part, size = [], 0
    if part:
        out.append(_chunk(part))
    end = pb.SnapshotEnd(sequence=sequence, count=len(files))
    out.append(pb.WatcherMessage(snapshot_end=end).SerializeToString())
    return out


@functools.lru_cache(maxsize=2)
def prepared_snapshot(count: int) -> tuple[bytes, ...]:
    """The serialized snapshot of `synthetic_files(count)`, built once per run."""
    return tuple(snapshot_msgs(synthetic_files(count)))


def _chunk(files: list[pb.FileInfo]) -> bytes:
    return pb.WatcherMessage(snapshot_chunk=pb.SnapshotChunk(files=files)).SerializeToString()


OP_ADD = pb.OP_ADD
OP_REMOVE = pb.OP_REMOVE
OP_MODIFY = pb.OP_MODIFY


Op: TypeAlias = pb.Op.ValueType
"""OP_ADD, OP_REMOVE or OP_MODIFY."""


def batch_msg(sequence: int, changes: Iterable[tuple[Op, File]], observed_ns: int = 0) -> bytes:
    """A serialized Batch of (op, file) changes."""
    batch = pb.Batch(
        sequence=sequence,
        changes=[
            pb.Change(op=op, file=pb.FileInfo(name=f[0], size=f[1], mtime_ns=f[2]))
            for op, f in changes
        ],
        observed_unix_ns=observed_ns or time.time_ns(),
    )
    return pb.WatcherMessage(batch=batch).SerializeToString()


def heartbeat_msg(sequence: int, want_ack: bool = True) -> bytes:
    """A serialized Heartbeat; `want_ack`: answered with an Ack (a barrier), as the watcher's
    own idle heartbeats are not."""
    beat = pb.Heartbeat(sequence=sequence, want_ack=want_ack)
    return pb.WatcherMessage(heartbeat=beat).SerializeToString()


GOODBYE = pb.WatcherMessage(goodbye=pb.Goodbye()).SerializeToString()


EMPTY_SNAPSHOT = (pb.WatcherMessage(snapshot_end=pb.SnapshotEnd()).SerializeToString(),)


def _same(data: bytes) -> bytes:
    return data


class SyncStream:
    """One Sync stream of a synthetic watcher named `node`; messages go out pre-serialized."""

    def __init__(self, channel: grpc.aio.Channel, node: str) -> None:
        self.node = node
        self.epoch = uuid.uuid4().hex
        self.sequence = 0
        sync = channel.stream_stream(
            SYNC_METHOD,
            request_serializer=_same,
            response_deserializer=pb.AggregatorMessage.FromString,
        )
        self._call: Any = sync()

    async def write(self, data: bytes) -> None:
        """Send one serialized WatcherMessage."""
        await self._call.write(data)

    async def read(self, timeout: float = 120.0) -> Any:  # noqa: ASYNC109 (a bench bound)
        """The next AggregatorMessage."""
        msg = await asyncio.wait_for(self._call.read(), timeout)
        if msg is grpc.aio.EOF:
            code = await self._call.code()
            details = await self._call.details()
            raise BenchError(f"stream of {self.node} ended: {code} {details}")
        return msg

    async def hello(self) -> Any:
        """Introduce ourselves; returns the Welcome."""
        await self.write(hello_msg(self.node, self.epoch, self.sequence))
        msg = await self.read()
        if msg.WhichOneof("kind") != "welcome":
            raise BenchError(f"{self.node}: expected a welcome, got {msg}")
        return msg.welcome

    async def snapshot(self, messages: Sequence[bytes]) -> int:
        """Send a prepared snapshot (chunks + end); returns the acknowledged sequence."""
        for data in messages:
            await self.write(data)
        return await self.expect_ack()

    async def expect_ack(self) -> int:
        """Read one Ack (anything else is an error)."""
        msg = await self.read()
        if msg.WhichOneof("kind") != "ack":
            raise BenchError(f"{self.node}: expected an ack, got {msg}")
        applied: int = msg.ack.applied_sequence
        return applied

    def next_batch(self, changes: Iterable[tuple[Op, File]], observed_ns: int = 0) -> bytes:
        """The next batch in sequence, serialized (sequence + 1 per batch)."""
        self.sequence += 1
        return batch_msg(self.sequence, changes, observed_ns)

    async def sync(self) -> int:
        """Heartbeat(sequence) -> Ack: every batch sent before is applied when this returns."""
        await self.write(heartbeat_msg(self.sequence))
        applied = await self.expect_ack()
        if applied != self.sequence:
            raise BenchError(f"{self.node}: applied {applied}, sent {self.sequence}")
        return applied

    async def goodbye(self) -> None:
        """Say goodbye (its files go at once) and close our side."""
        await self.write(GOODBYE)
        await self._call.done_writing()
        await asyncio.wait_for(self._call.code(), 10)

    def cancel(self) -> None:
        """Drop the stream."""
        self._call.cancel()


def channel(target: str) -> grpc.aio.Channel:
    """An insecure channel with the watcher's keepalive settings."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def open_stream(
    chan: grpc.aio.Channel, node: str, snapshot: Sequence[bytes] = EMPTY_SNAPSHOT
) -> SyncStream:
    """A synthetic watcher that said hello and whose snapshot (serialized messages) is in."""
    stream = SyncStream(chan, node)
    welcome = await stream.hello()
    if welcome.resume:
        raise BenchError(f"{node}: unexpected resume")
    await stream.snapshot(snapshot)
    return stream
