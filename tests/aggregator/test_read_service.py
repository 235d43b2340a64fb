"""The `FileIndex` read service over real sockets.

`ListFiles` pages and their tokens; `WatchFiles`: the list page by page, then
each change, resuming from a version, and readers too slow to keep up.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest

from aggregator.app import Aggregator
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc
from tests.aggregator.grpc_support import (
    HOST,
    TIMEOUT,
    AggregatorFactory,
    Peer,
    add,
    expect_rpc_error,
    listed,
    modify,
    open_channel,
    poll,
    remove,
    sample,
)

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


async def test_a_version_of_an_earlier_aggregator_gets_the_list_not_this_ones_events(
    make_aggregator: AggregatorFactory,
) -> None:
    """Versions never repeat across restarts: a reader resuming across one starts over."""
    first = await make_aggregator()
    async with open_channel(first) as channel:
        peer = Peer(channel, "node-a")
        await peer.join([b"a.txt", b"b.txt"])
        seen = first.store.index.version
        peer.call.cancel()
    await first.stop()
    again = await make_aggregator()  # a new process, as after a restart
    async with open_channel(again) as channel:
        peer = Peer(channel, "node-a")
        await peer.join([b"x%d.txt" % i for i in range(5)])  # more events than before
        assert again.store.index.version > seen
        stub = filewatch_pb2_grpc.FileIndexStub(channel)
        call = stub.WatchFiles(pb.WatchFilesRequest(resume_version=seen))
        message = await read_stream(call)
        assert message.WhichOneof("kind") == "list", message  # not events of this process
        assert [f.raw_name for f in message.list.files] == [b"x%d.txt" % i for i in range(5)]
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


async def test_a_reader_that_asks_gets_the_changes_waiting_for_it_together(
    aggregator: Aggregator, channel: Any
) -> None:
    """max_events_per_message: what is queued goes as one message; a lone change at once."""
    peer = Peer(channel, "node-a")
    await peer.join([b"old"])
    version = aggregator.store.index.version
    request = pb.WatchFilesRequest(max_events_per_message=10)
    call = filewatch_pb2_grpc.FileIndexStub(channel).WatchFiles(request)
    assert (await read_stream(call)).list.done
    await poll(lambda: aggregator.store.reader_count == 1, what="the reader")

    names = [b"f%02d" % i for i in range(25)]
    await peer.batch(1, *(add(n) for n in names))  # one publish of 25 events
    sizes: list[int] = []
    received: list[tuple[bytes, int]] = []
    while len(received) < len(names):
        message = await read_stream(call)
        assert message.WhichOneof("kind") == "events", message
        sizes.append(len(message.events.events))
        received += [(e.entry.raw_name, e.version) for e in message.events.events]
    assert sizes == [10, 10, 5]
    assert received == [(n, version + 1 + i) for i, n in enumerate(names)]

    await peer.batch(2, remove(b"old"))  # alone: it does not wait for company
    message = await read_stream(call)
    [event] = message.events.events
    assert (event.kind, event.entry.raw_name, event.version) == (
        pb.FileEvent.KIND_REMOVED,
        b"old",
        version + 26,
    )
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
    """The list is sent page by page from the live index while it changes.

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
