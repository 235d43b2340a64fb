"""The gRPC `Sync` stream's wire side: messages from the folder state, span attributes, options."""

from __future__ import annotations

from collections.abc import Iterable

from gen import filewatch_pb2 as pb
from watcher.scanner import FileStat
from watcher.state import Batch, Op

_OPS = {Op.ADD: pb.OP_ADD, Op.REMOVE: pb.OP_REMOVE, Op.MODIFY: pb.OP_MODIFY}


def batch_attributes(node: str, batch: Batch) -> dict[str, str | int]:
    """The attributes of a watcher's batch span."""
    return {
        "filewatch.node": node,
        "filewatch.count": len(batch.changes),
        "filewatch.sequence.first": batch.sequence,
        "filewatch.sequence.last": batch.sequence,
    }


def batch_to_pb(batch: Batch) -> pb.WatcherMessage:
    """A state batch as a proto message."""
    changes = [
        pb.Change(
            op=_OPS[c.op],
            file=pb.FileInfo(
                name=c.name,
                size=c.stat.size if c.stat else 0,
                mtime_ns=c.stat.mtime_ns if c.stat else 0,
            ),
        )
        for c in batch.changes
    ]
    return pb.WatcherMessage(
        batch=pb.Batch(sequence=batch.sequence, changes=changes, observed_unix_ns=batch.observed_ns)
    )


def snapshot_chunk_pb(files: Iterable[tuple[bytes, FileStat]]) -> pb.WatcherMessage:
    """Snapshot files as one chunk message.

    Each entry is added in place to the repeated field: building a `FileInfo`
    per file and copying it in costs twice as much, 100k times over at start-up.
    """
    msg = pb.WatcherMessage()
    msg.snapshot_chunk.SetInParent()
    add = msg.snapshot_chunk.files.add
    for name, (size, mtime_ns) in files:
        add(name=name, size=size, mtime_ns=mtime_ns)
    return msg


def channel_options(
    keepalive: float, reconnect_min: float, reconnect_max: float
) -> list[tuple[str, int]]:
    """The channel's options: keepalive pings, no retries, a reconnect backoff within ours.

    All arguments are in seconds.
    """
    return [
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive * 1000)),
        # A keepalive ping that finds another ping in flight (BDP probing) waits
        # for that one, whose timeout is this (default 60 s), not the above.
        ("grpc.http2.ping_timeout_ms", int(keepalive * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        # The channel's own reconnect backoff (1 s growing to 120 s by default)
        # must not outlast ours, or a restarted aggregator waits for minutes.
        ("grpc.initial_reconnect_backoff_ms", int(reconnect_min * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(reconnect_min * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(reconnect_max * 1000)),
    ]
