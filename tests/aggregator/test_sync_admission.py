"""Streams the aggregator refuses on `Sync`.

Bad input of every kind ends the stream with INVALID_ARGUMENT and changes
nothing; a live node's name cannot be taken by another epoch; `max_watchers`
and the token limit who may join. The well-behaved streams go on unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest

from aggregator.app import Aggregator
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc
from tests.aggregator.grpc_support import (
    TIMEOUT,
    AggregatorFactory,
    Peer,
    add,
    final_status,
    info,
    list_files,
    listed,
    names_of,
    open_channel,
    total,
)

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


# ---------------------------------------------------------------- Sync: who may join


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
        # The token is checked before the first read: the call may already have
        # ended with its status when the hello is written.
        anonymous = Peer(channel, "node-a")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await anonymous.send(_hello("node-a"))
        assert await anonymous.status() == grpc.StatusCode.UNAUTHENTICATED

        wrong = Peer(channel, "node-a", metadata=[("authorization", "Bearer nope")])
        with contextlib.suppress(grpc.aio.AioRpcError):
            await wrong.send(_hello("node-a"))
        assert await wrong.status() == grpc.StatusCode.UNAUTHENTICATED

        assert await listed(channel) == []

        good = Peer(channel, "node-a", metadata=[("authorization", "Bearer t")])
        await good.join([b"a.txt"])
        # The read API needs no token.
        assert await listed(channel) == [(b"a.txt", "node-a")]
        good.call.cancel()
