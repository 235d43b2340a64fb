"""Many watchers churning at once against one aggregator: nothing lost, memory comes back.

Synthetic watchers speak the real `Sync` protocol with the raw proto stubs, all
in this test's event loop, one channel (connection) each: hello, a snapshot in
chunks, then batches of random adds, removes and modifications, each applied
to the watcher's own truth first. After the churn every watcher waits for the
aggregator to acknowledge its last sequence; then the aggregator's list must
equal the union of the truths, entry by entry (name, node, size). Then they
all say goodbye and the aggregator's memory must come back down.

`make test` runs a scaled-down load (50 watchers x 200 files, 10 s of churn);
FILEWATCH_SOAK=1 (`make soak`) runs the full one (200 x 1,000, 60 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc
from tests.faults.conftest import (
    Aggregator,
    AggregatorFactory,
    measured,
    settled_rss,
)
from tests.support import http_request, wait_for_async

SOAK = os.environ.get("FILEWATCH_SOAK", "") not in ("", "0")
WATCHERS = 200 if SOAK else 50
FILES = 1000 if SOAK else 200
CHURN_SECONDS = 60.0 if SOAK else 10.0
BATCH_EVERY = 0.5 if SOAK else 0.1
"""Seconds between one watcher's batches (jittered)."""
CHANGES_PER_BATCH = 5
CHUNK = 500


@dataclass
class Synthetic:
    """One synthetic watcher: its truth and its position."""

    node: str
    rng: random.Random
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex)
    truth: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    sequence: int = 0
    applied: int = 0
    resyncs: int = 0
    counter: int = 0
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    call: Any = None

    def _name(self) -> bytes:
        self.counter += 1
        return b"%s-%07d.dat" % (self.node.encode(), self.counter)

    def _meta(self) -> tuple[int, int]:
        return self.rng.randrange(1, 1 << 20), time.time_ns()

    async def connect(self, channel: grpc.aio.Channel) -> None:
        """Hello, snapshot of FILES files, and wait for its ack."""
        for _ in range(FILES):
            self.truth[self._name()] = self._meta()
        self.call = pb_grpc.WatcherSyncStub(channel).Sync()
        await self.call.write(pb.WatcherMessage(hello=pb.Hello(node=self.node, epoch=self.epoch)))
        first = await self.call.read()
        assert first.WhichOneof("kind") == "welcome" and not first.welcome.resume, first
        items = list(self.truth.items())
        for i in range(0, len(items), CHUNK):
            files = [pb.FileInfo(name=n, size=s, mtime_ns=m) for n, (s, m) in items[i : i + CHUNK]]
            await self.call.write(pb.WatcherMessage(snapshot_chunk=pb.SnapshotChunk(files=files)))
        end = pb.SnapshotEnd(sequence=0, count=len(items))
        await self.call.write(pb.WatcherMessage(snapshot_end=end))

    async def read_loop(self) -> None:
        """Track acks; a resync would mean a lost or misordered batch."""
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            kind = msg.WhichOneof("kind")
            if kind == "ack":
                self.applied = msg.ack.applied_sequence
                if self.applied >= self.sequence:
                    self.acked.set()
            elif kind == "resync":
                self.resyncs += 1

    def _changes(self) -> list[pb.Change]:
        changes: dict[bytes, pb.Change] = {}
        for _ in range(CHANGES_PER_BATCH):
            roll = self.rng.random()
            names = list(self.truth)
            if roll < 0.35 or not names:
                name = self._name()
                self.truth[name] = meta = self._meta()
                op = pb.OP_ADD
            elif roll < 0.7:
                name = self.rng.choice(names)
                meta = self.truth.pop(name)
                op = pb.OP_REMOVE
            else:
                name = self.rng.choice(names)
                self.truth[name] = meta = self._meta()
                op = pb.OP_MODIFY
            # Net change per name within one batch, as a real watcher coalesces.
            changes[name] = pb.Change(
                op=op, file=pb.FileInfo(name=name, size=meta[0], mtime_ns=meta[1])
            )
        return list(changes.values())

    async def churn(self, until: float) -> int:
        """Send batches until `until` (monotonic); returns how many changes went out."""
        sent = 0
        await asyncio.sleep(self.rng.uniform(0, BATCH_EVERY))
        while time.monotonic() < until:
            changes = self._changes()
            self.sequence += 1
            self.acked.clear()
            batch = pb.Batch(
                sequence=self.sequence, changes=changes, observed_unix_ns=time.time_ns()
            )
            await self.call.write(pb.WatcherMessage(batch=batch))
            sent += len(changes)
            await asyncio.sleep(BATCH_EVERY * self.rng.uniform(0.5, 1.5))
        return sent

    async def settle(self) -> None:
        """A heartbeat with the last sequence, and wait for the ack that covers it."""
        self.acked.clear()
        await self.call.write(
            pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=self.sequence, want_ack=True))
        )
        await asyncio.wait_for(self.acked.wait(), 60)

    async def goodbye(self) -> None:
        """Leave cleanly: the aggregator removes the files at once."""
        await self.call.write(pb.WatcherMessage(goodbye=pb.Goodbye()))
        await self.call.done_writing()
        await asyncio.wait_for(self.call.code(), 30)


async def _get(port: int, path: str) -> Any:
    reply = await asyncio.to_thread(http_request, port, "GET", path, None, None, timeout=60.0)
    assert reply.status == 200, reply
    return reply.json()


@dataclass
class Round:
    """What one round of load measured (RSS in KiB)."""

    peak: int
    after: int
    sent: int


async def _round(agg: Aggregator, label: str, churn_seconds: float, seed: int) -> Round:
    """Connect WATCHERS synthetic watchers, churn, check every entry, then all leave."""
    rng = random.Random(seed)
    watchers = [Synthetic(f"{label}-{i:03d}", random.Random(rng.random())) for i in range(WATCHERS)]
    channels = [grpc.aio.insecure_channel(agg.grpc_target) for _ in watchers]
    readers: list[asyncio.Task[None]] = []
    try:
        started = time.monotonic()
        await asyncio.gather(*(w.connect(ch) for w, ch in zip(watchers, channels, strict=True)))
        readers = [asyncio.create_task(w.read_loop()) for w in watchers]
        await wait_for_async(
            lambda: _get(agg.http_port, "/healthz"),
            120,
            until=lambda h: h["files"] == WATCHERS * FILES,
            what="every snapshot installed",
        )
        measured(
            f"load {label}: {WATCHERS} watchers x {FILES} files connected and listed",
            time.monotonic() - started,
        )

        peak = agg.proc.rss_kib()
        until = time.monotonic() + churn_seconds
        churners = asyncio.gather(*(w.churn(until) for w in watchers))
        while not churners.done():
            peak = max(peak, agg.proc.rss_kib())
            await asyncio.wait({churners}, timeout=0.5)
        sent = sum(churners.result())

        settled = time.monotonic()
        await asyncio.gather(*(w.settle() for w in watchers))
        measured(f"load {label}: churn stopped -> last batches acked", time.monotonic() - settled)
        body = await _get(agg.http_port, "/files/?detail=1")
        peak = max(peak, agg.proc.rss_kib())
        listed: dict[str, dict[str, int]] = {}
        for entry in body["files"]:
            node_files = listed.setdefault(entry["node"], {})
            assert entry["filename"] not in node_files, f"duplicate entry {entry}"
            node_files[entry["filename"]] = entry["size"]
        for w in watchers:
            truth = {os.fsdecode(n): s for n, (s, _) in w.truth.items()}
            assert listed.get(w.node, {}) == truth, f"{w.node}: the list differs from its truth"
            assert w.resyncs == 0 and w.applied == w.sequence, (w.node, w.resyncs, w.applied)
        assert body["count"] == sum(len(w.truth) for w in watchers)
        assert agg.metric("filewatch_resyncs_total") == 0
        measured(
            f"load {label}: changes applied in {churn_seconds:.0f} s of churn", sent, "changes"
        )

        left = time.monotonic()
        await asyncio.gather(*(w.goodbye() for w in watchers))
        await wait_for_async(
            lambda: _get(agg.http_port, "/healthz"),
            60,
            until=lambda h: h["files"] == 0 and h["watchers"] == 0,
            what="every watcher gone",
        )
        measured(f"load {label}: all said goodbye -> index empty", time.monotonic() - left)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for ch in channels:
            await ch.close()
    # The read API drops its cached encodings of the old lists at the next read.
    await _get(agg.http_port, "/files/?detail=1")
    await _get(agg.http_port, "/files/")
    assert "load-" not in agg.metrics(), "per-watcher series must go with the watchers"
    after = await settled_rss(agg.proc)
    measured(f"load {label}: aggregator RSS peak", peak / 1024, "MiB")
    measured(f"load {label}: aggregator RSS after they left", after / 1024, "MiB")
    return Round(peak, after, sent)


@pytest.mark.timeout(1800 if SOAK else 120)
async def test_many_watchers_churning_lose_nothing_and_memory_stays_level(
    start_aggregator: AggregatorFactory,
) -> None:
    """Rounds of the same load: each exact; a later one leaves no more memory than the first.

    What memory is promised: bounded, and level across repeated rounds. CPython's
    allocator keeps some of what a load used (its arenas are returned only when
    empty), but reuses it for the next load instead of growing.
    """
    agg = start_aggregator("--keepalive", "10", ttl=60.0)
    await _get(agg.http_port, "/files/?detail=1")
    before = agg.proc.rss_kib()
    measured("load: aggregator RSS before", before / 1024, "MiB")
    first = await _round(agg, "load-a", CHURN_SECONDS, 7)
    second = await _round(agg, "load-b", CHURN_SECONDS if SOAK else 2.0, 8)
    footprint = first.peak - before
    slack = max(10 * 1024, footprint // 4)  # allocator noise: freed memory is reused unevenly
    assert first.after <= first.peak + slack, "memory grew after the watchers left"
    assert second.after <= first.after + slack, (
        f"a second identical load left {(second.after - first.after) / 1024:.1f} MiB more "
        "behind: memory leaks"
    )
    assert second.peak <= first.peak + slack, "the same load took more memory the second time"
    if SOAK:
        third = await _round(agg, "load-c", CHURN_SECONDS, 9)
        assert third.after <= first.after + slack, (
            f"a third load left {(third.after - first.after) / 1024:.1f} MiB more behind "
            "than the first: memory grows round after round"
        )
