"""WatchFiles readers that stop reading: dropped with a clear status, memory bounded.

- One reader stops reading while a synthetic watcher (raw Sync stream) pushes
  18,000 events of ~1 KB each; the index itself stays small (the same 100 names
  added and removed in turn), so any growth of the aggregator's memory would
  be buffered events. A reader that keeps up is not disturbed.
- 200 readers stop reading, then one snapshot of 100,000 files is installed:
  compared with the same snapshot unwatched, they may cost no copy of it.
- 50 readers ask for the list of 100,000 files and never read: each costs the
  aggregator one page of it, not a copy; all are counted; they are dropped
  once a message has waited the write timeout.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc
from tests.faults.conftest import (
    Aggregator,
    AggregatorFactory,
    RawSync,
    batch_msg,
    chunk_msg,
    end_msg,
    heartbeat_msg,
    hello_msg,
    measured,
    settled_rss,
)
from tests.support import wait_for

READER_QUEUE = 2000
NAMES = [b"n%04d-" % i + b"x" * 1000 for i in range(100)]
WARM_UP = 1000
BATCHES = 800
PER_BATCH = 10
PACE = 0.03
"""Seconds of pause every 5 batches while readers watch: ~1,600 events a second, which a
reader in Python keeps up with even on a busy machine."""


class FollowingReader:
    """A WatchFiles reader in a thread that keeps up: rebuilds the list from the events."""

    def __init__(self, stub: pb_grpc.FileIndexStub) -> None:
        self.call = stub.WatchFiles(pb.WatchFilesRequest())
        self.files: set[tuple[bytes, str]] = set()
        self.version = 0
        self.events = 0
        self.code: grpc.StatusCode | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for msg in self.call:
                if msg.WhichOneof("kind") == "list":
                    self.files.update((f.raw_name, f.node) for f in msg.list.files)
                    self.version = msg.list.version
                    continue
                ev = msg.event
                key = (ev.entry.raw_name, ev.entry.node)
                if ev.kind == pb.FileEvent.KIND_REMOVED:
                    self.files.discard(key)
                else:
                    self.files.add(key)
                self.version = ev.version
                self.events += 1
        except grpc.RpcError as err:
            self.code = err.code()


def _open(sync: RawSync) -> None:
    """Hello and an empty snapshot."""
    sync.send(hello_msg("feeder", "e1"), end_msg(0, 0))
    sync.recv_kind("welcome")
    sync.recv_kind("ack")


def _feed(sync: RawSync, first: int, batches: int, pace: float) -> int:
    """`batches` batches from sequence `first`, toggling the 100 names; waits for the ack."""
    for k in range(first, first + batches):
        changes = []
        for j in range(PER_BATCH):
            n = k * PER_BATCH + j
            op = pb.OP_ADD if (n // len(NAMES)) % 2 == 0 else pb.OP_REMOVE
            changes.append((op, NAMES[n % len(NAMES)]))
        sync.send(batch_msg(k, *changes))
        if pace and k % 5 == 4:
            time.sleep(pace)
    last = first + batches - 1
    sync.send(heartbeat_msg(last))
    while sync.recv_kind("ack", timeout=60).ack.applied_sequence < last:
        pass
    return last + 1


@pytest.mark.timeout(90)
def test_a_reader_that_stops_reading_is_dropped_and_memory_stays_bounded(
    start_aggregator: AggregatorFactory,
    channels: Callable[[str], grpc.Channel],
    tmp_path: Path,
) -> None:
    agg = start_aggregator("--reader-queue", str(READER_QUEUE), ttl=30.0)
    stub = pb_grpc.FileIndexStub(channels(agg.grpc_target))
    sync = RawSync(channels(agg.grpc_target))
    _open(sync)
    # Warm-up, full speed, nobody watching: the aggregator's bounded history of
    # recent events fills up (and its allocator warms), so that what follows
    # measures only the effect of a stalled reader.
    sequence = _feed(sync, 1, WARM_UP, 0.0)
    rss_before = agg.proc.rss_kib()

    follower = FollowingReader(pb_grpc.FileIndexStub(channels(agg.grpc_target)))
    stalled = stub.WatchFiles(pb.WatchFilesRequest())
    first = next(stalled)  # the list; from now on this reader reads nothing
    assert first.WhichOneof("kind") == "list"
    wait_for(lambda: agg.metric("filewatch_watch_readers"), 5, until=lambda n: n == 2, what="2")
    wait_for(lambda: follower.version, 5, until=bool, what="the follower's list")
    start_version = follower.version
    started = time.monotonic()
    _feed(sync, sequence, BATCHES, PACE)
    wait_for(
        lambda: agg.metric("filewatch_watch_readers_dropped_total"),
        10,
        until=lambda n: n >= 1,
        what="the stalled reader to be dropped",
    )
    measured(
        f"{BATCHES * PER_BATCH} events of ~1 KB -> stalled reader dropped",
        time.monotonic() - started,
    )
    rss_after = agg.proc.rss_kib()
    growth_mib = (rss_after - rss_before) / 1024
    measured("aggregator RSS growth while a reader was stalled", growth_mib, "MiB")
    # 8 MB of events went by; what may stay is one reader queue and socket buffers.
    assert growth_mib < 10, f"RSS grew by {growth_mib:.1f} MiB: events were buffered"
    assert follower.code is None, f"the reader that kept up was dropped: {follower.code}"
    assert agg.metric("filewatch_watch_readers_dropped_total") == 1
    # Dropped, it is still a reader until its status, behind what it did not read, reaches it.
    assert agg.metric("filewatch_watch_readers") == 2

    # The stalled reader reads again: what the transport held, then a clear status.
    got = 0
    with pytest.raises(grpc.RpcError) as info:
        for _ in stalled:
            got += 1
    err = info.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert "slow" in (err.details() or ""), err.details()
    assert got < BATCHES * PER_BATCH
    wait_for(lambda: agg.metric("filewatch_watch_readers"), 5, until=lambda n: n == 1, what="1")

    # The reader that kept up was not disturbed and holds exactly the index.
    version = agg.request("GET", "/files/?detail=1").json()["version"]
    wait_for(lambda: follower.version, 10, until=lambda v: v == version, what="follower caught up")
    assert follower.code is None, f"the reader that kept up was dropped: {follower.code}"
    listed = stub.ListFiles(pb.ListFilesRequest(page_size=1000))
    assert follower.files == {(f.raw_name, f.node) for f in listed.files}
    assert follower.events == version - start_version  # every event, each exactly once
    follower.call.cancel()
    sync.cancel()


def _snapshot(channel: grpc.Channel, node: str, count: int) -> RawSync:
    """A raw watcher `node` whose snapshot of `count` files is acknowledged."""
    names = [b"%s-%07d.dat" % (node.encode(), i) for i in range(count)]
    sync = RawSync(channel).send(hello_msg(node, "e1"))
    for i in range(0, count, 5000):
        sync.send(chunk_msg(names[i : i + 5000]))
    sync.send(end_msg(0, count))
    sync.recv_kind("welcome")
    sync.recv_kind("ack", timeout=60)
    return sync


READERS = 200


@pytest.mark.timeout(90)
def test_many_stalled_readers_cost_no_memory_per_event_of_a_big_snapshot(
    start_aggregator: AggregatorFactory, channels: Callable[[str], grpc.Channel]
) -> None:
    """200 readers stop reading, then a watcher's snapshot of 100,000 files is installed.

    Each stalled reader may hold its queue (--reader-queue events), never its own
    copy of a snapshot: 200 readers x 100,000 events would be 160 MB of references
    (1,000 readers, the default limit, and a million files: 8 GB).
    """
    agg = start_aggregator(ttl=30.0)
    channel = channels(agg.grpc_target)
    # Control: the same snapshot with nobody watching.
    before = agg.proc.rss_kib()
    control = _snapshot(channel, "control", 100_000)
    index_cost = agg.proc.rss_kib() - before

    stub = pb_grpc.FileIndexStub(channels(agg.grpc_target))
    version = stub.ListFiles(pb.ListFilesRequest(page_size=1)).version
    # Readers resuming from the current version: no list to send; they read nothing.
    request = pb.WatchFilesRequest(resume_version=version)
    readers = [stub.WatchFiles(request) for _ in range(READERS)]
    wait_for(lambda: agg.metric("filewatch_watch_readers"), 10, until=lambda n: n == READERS)
    before = agg.proc.rss_kib()
    watched = _snapshot(channel, "watched", 100_000)
    cost = agg.proc.rss_kib() - before
    extra_mib = (cost - index_cost) / 1024
    what = f"{READERS} stalled readers + a 100,000-file snapshot: RSS beyond the index"
    measured(what, extra_mib, "MiB")
    assert extra_mib < 40, (
        f"{READERS} stalled readers cost {extra_mib:.0f} MiB more than the snapshot itself "
        f"({index_cost / 1024:.0f} MiB): each holds its own copy of the events"
    )
    for reader in readers:
        reader.cancel()
    control.cancel()
    watched.cancel()


IDLE_READERS = 50
IDLE_FILES = 100_000
WRITE_TIMEOUT = 8.0
IDLE_READER_KIB = 1024
"""Bound on the RSS one reader that never reads costs: its call, its queue and the one
page of the list being written. Measured 270-300 KiB; when each reader copied the whole
list first, 33 MiB here (33 GB at the default limit of 1,000 readers)."""


def _files_median_ms(agg: Aggregator) -> float:
    """Median time of 5 GET /files/, in ms (recorded, never asserted)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        reply = agg.request("GET", "/files/")
        times.append(time.perf_counter() - start)
        assert reply.status == 200, reply
    return statistics.median(times) * 1000


@pytest.mark.timeout(90)
def test_readers_that_never_read_cost_a_page_each_and_are_dropped_after_the_write_timeout(
    start_aggregator: AggregatorFactory,
) -> None:
    agg = start_aggregator("--reader-write-timeout", str(WRITE_TIMEOUT), ttl=30.0)
    # Readers without BDP probing: their flow-control windows stay at 64 KB, so
    # one that does not read stalls after a page or so. (With probing, gRPC grows
    # a window that keeps receiving to MBs: an idle client then takes in much of
    # the list into its own memory before it stalls; the aggregator's part is
    # the same.)
    with (
        grpc.insecure_channel(agg.grpc_target) as feed_channel,
        grpc.insecure_channel(agg.grpc_target, options=[("grpc.http2.bdp_probe", 0)]) as idle,
    ):
        feeder = _snapshot(feed_channel, "big", IDLE_FILES)
        before = asyncio.run(settled_rss(agg.proc))
        files_ms = _files_median_ms(agg)
        stub = pb_grpc.FileIndexStub(idle)
        readers = [stub.WatchFiles(pb.WatchFilesRequest()) for _ in range(IDLE_READERS)]
        wait_for(
            lambda: agg.metric("filewatch_watch_readers"),
            20,
            until=lambda n: n == IDLE_READERS,
            what=f"the gauge to count {IDLE_READERS} readers",
        )
        after = asyncio.run(settled_rss(agg.proc))
        assert agg.metric("filewatch_watch_readers_dropped_total") == 0, "dropped before measured"
        per_reader = measured(
            f"RSS per reader that never reads ({IDLE_FILES:,}-file list)",
            (after - before) / IDLE_READERS,
            "KiB",
        )
        assert per_reader < IDLE_READER_KIB, (
            f"each idle reader costs {per_reader:.0f} KiB: more than a page of the list"
        )
        assert agg.metric("filewatch_watch_readers") == IDLE_READERS
        listed = agg.request("GET", "/files/")
        assert listed.status == 200 and len(listed.json()["files"]) == IDLE_FILES
        measured("GET /files/ median, no reader", files_ms, "ms")
        measured(f"GET /files/ median, {IDLE_READERS} idle readers", _files_median_ms(agg), "ms")

        # Changes flow; the readers' next messages wait, and past the write timeout
        # each reader is dropped (far fewer events than its queue holds).
        sequence = 0

        def feed_and_count() -> float:
            nonlocal sequence
            sequence += 1
            feeder.send(batch_msg(sequence, (pb.OP_ADD, b"churn-%06d" % sequence)))
            return agg.metric("filewatch_watch_readers_dropped_total")

        started = time.monotonic()
        wait_for(
            feed_and_count,
            WRITE_TIMEOUT + 15,
            until=lambda n: n == IDLE_READERS,
            what="every idle reader to be dropped",
            interval=0.05,
        )
        what = f"{IDLE_READERS} idle readers dropped (write timeout {WRITE_TIMEOUT:g} s)"
        measured(what, time.monotonic() - started)
        assert sequence < READER_QUEUE // 2  # so not for a full queue
        # Still readers until their status reaches them, behind what they did not read.
        assert agg.metric("filewatch_watch_readers") == IDLE_READERS
        for reader in readers:
            with pytest.raises(grpc.RpcError) as info:
                for _ in reader:
                    pass
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "not reading" in (info.value.details() or ""), info.value.details()
        wait_for(
            lambda: agg.metric("filewatch_watch_readers"),
            10,
            until=lambda n: n == 0,
            what="the dropped readers' calls to end",
        )
        feeder.cancel()
