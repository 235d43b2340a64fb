"""The `Sync` stream of a well-behaved watcher, over real sockets.

Hello and Welcome, snapshots in chunks, batches in order, gaps and resyncs,
resuming in the same epoch and starting over in a new one; then how a node
leaves: goodbye, a clean half-close, a broken stream kept for the TTL, the
hello timeout, shutdown. Heartbeats double as barriers and set the gauges.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from aggregator.app import Aggregator
from gen import filewatch_pb2 as pb
from tests.aggregator.grpc_support import (
    MTIME_NS,
    MTIME_TEXT,
    TIMEOUT,
    AggregatorFactory,
    Peer,
    add,
    eventually,
    info,
    list_files,
    listed,
    modify,
    names_of,
    open_channel,
    poll,
    remove,
    sample,
)

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


async def test_a_heartbeat_is_answered_only_when_it_asks_or_is_ahead(channel: Any) -> None:
    """The watcher's idle heartbeats ask for nothing: an idle stream costs no write."""
    peer = Peer(channel, "node-a")
    await peer.join([b"a.txt"])
    await peer.send(pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=0)))
    await peer.batch(1, add(b"b.txt"))
    # Had the first heartbeat been answered, its Ack (applied 0) would come first.
    assert (await peer.heartbeat(sequence=1)).ack.applied_sequence == 1
    # A heartbeat ahead of what was applied gets a resync, asked or not.
    await peer.send(pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=5)))
    assert (await peer.receive()).WhichOneof("kind") == "resync"
    peer.call.cancel()


async def test_the_files_gauge_follows_batches_and_comes_back_after_a_rejoin(
    aggregator: Aggregator, channel: Any
) -> None:
    files = "filewatch_watcher_files"
    for round_ in range(2):
        peer = Peer(channel, "node-a")
        await peer.join([b"a.txt"])
        assert sample(aggregator, files, node="node-a") == 1, f"round {round_}"
        await peer.batch(1, add(b"b.txt"), add(b"c.txt"))
        await peer.batch(2, remove(b"a.txt"))
        assert (await peer.heartbeat(sequence=2)).WhichOneof("kind") == "ack"
        assert sample(aggregator, files, node="node-a") == 2, f"round {round_}"
        await peer.send(pb.WatcherMessage(goodbye=pb.Goodbye()))
        assert await peer.status() == grpc.StatusCode.OK
        assert aggregator.metrics.registry.get_sample_value(files, {"node": "node-a"}) is None
