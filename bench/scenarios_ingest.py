"""Ingest: synthetic gRPC watchers send batches as fast as the aggregator takes them.

`ingest` sends big batches; `small_batches` sends one change per batch from
many streams while WatchFiles readers and a GET /files/ poller read along.

Each writer is its own channel (connection) and Sync stream. Batches are
prepared and serialized before the clock starts; after its last batch a
writer sends a heartbeat and waits for the Ack, so when every writer has its
Ack every change has been applied. Throughput is the aggregator's own counter
of applied changes (filewatch_changes_applied_total) over that wall time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import statistics
import threading
import time

import grpc

from bench.harness import (
    AggregatorProc,
    BenchError,
    Check,
    Context,
    CpuWindow,
    FilesPoller,
    ScenarioResult,
    Table,
    human,
    metric_total,
    run_async,
    say,
    start_aggregator,
    summarize,
)
from bench.synthetic import (
    OP_ADD,
    OP_MODIFY,
    OP_REMOVE,
    File,
    Op,
    SyncStream,
    channel,
    open_stream,
    prepared_snapshot,
    synthetic_files,
)
from gen import filewatch_pb2 as pb

ROUNDS_FULL = 3
ROUNDS_QUICK = 2


class _Writer:
    """One synthetic watcher and the batches it will send, prepared in advance."""

    def __init__(self, index: int, batch_size: int) -> None:
        self.index = index
        self.batch_size = batch_size
        self.pool: collections.deque[File] = collections.deque()
        self.next_name = 0
        self.stream: SyncStream | None = None

    def _fresh(self, count: int) -> list[File]:
        files = synthetic_files(count, self.next_name, b"w%d-" % self.index)
        self.next_name += count
        return files

    def prepare(self, batches: int) -> tuple[list[bytes], int]:
        """Serialized batches of effective changes (adds, modifies, removes) and their count."""
        assert self.stream is not None
        out, changes = [], 0
        size = self.batch_size
        for _ in range(batches):
            ops: list[tuple[Op, File]] = []
            if len(self.pool) < 2 * size:
                added = self._fresh(size)
                ops += [(OP_ADD, f) for f in added]
                self.pool.extend(added)
            else:
                third = size // 3
                added = self._fresh(third)
                ops += [(OP_ADD, f) for f in added]
                for _ in range(third):
                    name, fsize, mtime = self.pool.popleft()
                    changed = (name, fsize + 1, mtime + 1)
                    ops.append((OP_MODIFY, changed))
                    self.pool.append(changed)
                ops += [(OP_REMOVE, self.pool.popleft()) for _ in range(size - 2 * third)]
                self.pool.extend(added)
            out.append(self.stream.next_batch(ops))
            changes += len(ops)
        return out, changes

    async def send(self, messages: list[bytes]) -> None:
        """Send every batch, then wait until the aggregator has applied them all."""
        assert self.stream is not None
        for data in messages:
            await self.stream.write(data)
        await self.stream.sync()


async def _measure(ctx: Context, agg: AggregatorProc) -> dict[str, object]:
    z = ctx.sizes
    channels = [channel(agg.grpc_target) for _ in range(z.ingest_writers + 1)]
    try:
        say(f"ingest: loading {z.ingest_background:,} background files")
        background = await open_stream(
            channels[0], "ingest-background", prepared_snapshot(z.ingest_background)
        )
        writers = [_Writer(i, z.ingest_batch_size) for i in range(z.ingest_writers)]
        for w, chan in zip(writers, channels[1:], strict=True):
            w.stream = await open_stream(chan, f"ingest-{w.index}")
        rounds = ROUNDS_QUICK if ctx.quick else ROUNDS_FULL
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            prepared = [w.prepare(z.ingest_batches) for w in writers]
            sent = sum(n for _, n in prepared)
            say(f"ingest round {r + 1}/{rounds}: {sent:,} changes from {len(writers)} writers")
            # The background stream is otherwise silent: past the watcher TTL its
            # files would expire, 100k removals counted in the round.
            await background.sync()
            before = metric_total(agg.http_port, "filewatch_changes_applied_total")
            cpu = CpuWindow([agg.pid, os.getpid()])
            with ctx.profiled(agg.pid, "ingest:aggregator:round 1", when=r == 0):
                cpu.start()
                t0 = time.perf_counter()
                await asyncio.gather(
                    *(w.send(msgs) for w, (msgs, _) in zip(writers, prepared, strict=True))
                )
                seconds = time.perf_counter() - t0
                agg_cpu, own_cpu = cpu.stop()
            applied = metric_total(agg.http_port, "filewatch_changes_applied_total") - before
            if applied != sent:
                raise BenchError(f"sent {sent} effective changes, the aggregator applied {applied}")
            per_round.append(
                {
                    "changes": applied,
                    "seconds": seconds,
                    "per_second": applied / seconds,
                    "aggregator_cpu_percent": agg_cpu,
                    "bench_cpu_percent": own_cpu,
                }
            )
        for w in writers:
            assert w.stream is not None
            await w.stream.goodbye()
        await background.goodbye()
        return {"rounds": per_round}
    finally:
        for chan in channels:
            await chan.close()


def run_ingest(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """ingest: changes applied per second from synthetic gRPC watchers."""
    z = ctx.sizes
    procs = ctx.procs("ingest")
    try:
        agg = start_aggregator(procs, "aggregator")
        m = run_async(_measure(ctx, agg))
    finally:
        procs.stop_all()
    rounds = m["rounds"]
    assert isinstance(rounds, list)
    res = ScenarioResult(
        "ingest",
        f"ingest: {z.ingest_writers} synthetic gRPC watchers x {z.ingest_batches} batches of "
        f"{z.ingest_batch_size} changes, over {human(z.ingest_background)} files",
        ">= 100,000 changes applied per second",
    )
    table = Table(["round", "changes", "seconds", "changes/s", "aggregator CPU %", "bench CPU %"])
    for i, r in enumerate(rounds, 1):
        table.rows.append(
            [
                i,
                r["changes"],
                r["seconds"],
                r["per_second"],
                r["aggregator_cpu_percent"],
                r["bench_cpu_percent"],
            ]
        )
    rates = [float(r["per_second"]) for r in rounds]
    s = summarize(rates)
    table.rows.append(["median", "", "", statistics.median(rates), "", ""])
    res.tables.append(table)
    res.figures.update(rounds=rounds, changes_per_second=s)
    res.checks.append(
        Check(
            "changes applied per second (median of rounds)", s["p50"], 100_000, "changes/s", op=">="
        )
    )
    res.notes.append(
        "batches mix adds, modifies and removes (each effective); the first two batches of a "
        "writer only add; batches serialized before the clock starts"
    )
    return [res]


# ---------------------------------------------------------------- small batches

WATCH_FILES = "/filewatch.v1.FileIndex/WatchFiles"


async def _read_watch_files(
    chan: grpc.aio.Channel, stats: list[int], listed: asyncio.Event
) -> None:
    """A WatchFiles reader that counts messages and bytes (not parsed: the bench stays cheap)."""
    watch = chan.unary_stream(
        WATCH_FILES,
        request_serializer=pb.WatchFilesRequest.SerializeToString,
        response_deserializer=_raw,
    )
    call = watch(pb.WatchFilesRequest(max_events_per_message=1000))
    first = True
    async for data in call:
        if first:
            listed.set()  # the initial listing's first message: the stream is open
            first = False
        stats[0] += 1
        stats[1] += len(data)


def _raw(data: bytes) -> bytes:
    return data


def _poll_files(port: int, stop: threading.Event, counts: list[int]) -> None:
    """GET /files/ with If-None-Match, back to back, until `stop` (in a thread)."""
    poller = FilesPoller(port)
    try:
        while not stop.is_set():
            counts[1 if poller.poll() else 0] += 1
    finally:
        poller.close()


def _one_change_batches(stream: SyncStream, count: int, index: int) -> list[bytes]:
    """`count` one-change batches: one file added, then removed, and so on (each effective)."""
    (file,) = synthetic_files(1, index, b"small-")
    return [stream.next_batch([(OP_ADD if i % 2 == 0 else OP_REMOVE, file)]) for i in range(count)]


async def _measure_small(ctx: Context, agg: AggregatorProc) -> dict[str, object]:
    z = ctx.sizes
    writer_channels = [channel(agg.grpc_target) for _ in range(z.small_streams)]
    reader_channels = [
        grpc.aio.insecure_channel(
            agg.grpc_target, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        )
        for _ in range(z.small_readers)
    ]
    readers: list[asyncio.Task[None]] = []
    stop_poll = threading.Event()
    try:
        streams = [await open_stream(chan, f"small-{i}") for i, chan in enumerate(writer_channels)]
        prepared = [_one_change_batches(s, z.small_batches, i) for i, s in enumerate(streams)]
        reader_stats = [[0, 0] for _ in reader_channels]
        opened = [asyncio.Event() for _ in reader_channels]
        readers = [
            asyncio.create_task(_read_watch_files(chan, stats, ev))
            for chan, stats, ev in zip(reader_channels, reader_stats, opened, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in opened)), 60)
        poll_counts = [0, 0]
        poller = asyncio.create_task(
            asyncio.to_thread(_poll_files, agg.http_port, stop_poll, poll_counts)
        )
        sent = z.small_streams * z.small_batches
        say(
            f"small_batches: {z.small_streams} streams x {z.small_batches} one-change batches, "
            f"{z.small_readers} WatchFiles readers, a GET /files/ poller"
        )
        before = metric_total(agg.http_port, "filewatch_changes_applied_total")
        cpu = CpuWindow([agg.pid, os.getpid()])
        with ctx.profiled(agg.pid, "small_batches:aggregator"):
            cpu.start()
            t0 = time.perf_counter()

            async def send(stream: SyncStream, messages: list[bytes]) -> None:
                for data in messages:
                    await stream.write(data)
                await stream.sync()

            await asyncio.gather(*(send(s, m) for s, m in zip(streams, prepared, strict=True)))
            seconds = time.perf_counter() - t0
            agg_cpu, own_cpu = cpu.stop()
        stop_poll.set()
        await poller
        applied = metric_total(agg.http_port, "filewatch_changes_applied_total") - before
        if applied != sent:
            raise BenchError(f"sent {sent} effective changes, the aggregator applied {applied}")
        for reader in readers:
            if reader.done():
                reader.result()  # a reader that ended early says why
                raise BenchError("a WatchFiles reader ended early")
        for s in streams:
            await s.goodbye()
        return {
            "changes": applied,
            "seconds": seconds,
            "changes_per_second": applied / seconds,
            "aggregator_cpu_percent": agg_cpu,
            "bench_cpu_percent": own_cpu,
            "reader_messages": [m for m, _ in reader_stats],
            "reader_bytes": [b for _, b in reader_stats],
            "files_polls_304": poll_counts[0],
            "files_polls_200": poll_counts[1],
        }
    finally:
        stop_poll.set()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for chan in (*writer_channels, *reader_channels):
            await chan.close()


def run_small_batches(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """small_batches: one change per batch from many streams, with readers reading along."""
    del selected
    z = ctx.sizes
    procs = ctx.procs("small-batches")
    try:
        agg = start_aggregator(procs, "aggregator")
        m = run_async(_measure_small(ctx, agg))
    finally:
        procs.stop_all()
    res = ScenarioResult(
        "small_batches",
        f"{z.small_streams} synthetic gRPC streams x {z.small_batches} batches of one change, "
        f"sent as fast as the protocol lets them, with {z.small_readers} WatchFiles readers and "
        "a GET /files/ poller",
        ">= 15,000 changes applied per second on one aggregator",
    )
    table = Table(
        ["changes", "seconds", "changes/s", "aggregator CPU %", "bench CPU %", "GET /files/ 200s"]
    )
    table.rows.append(
        [
            m["changes"],
            m["seconds"],
            m["changes_per_second"],
            m["aggregator_cpu_percent"],
            m["bench_cpu_percent"],
            m["files_polls_200"],
        ]
    )
    res.tables.append(table)
    res.figures.update(m)
    rate = m["changes_per_second"]
    assert isinstance(rate, float)
    res.checks.append(Check("changes applied per second", rate, 15_000, "changes/s", op=">="))
    res.notes += [
        "each stream adds then removes one file of its own, one change per batch, every batch "
        "serialized before the clock starts; after its last batch a stream sends a heartbeat "
        "and waits for the Ack",
        "readers ask max_events_per_message=1000 and count messages without parsing them; the "
        "poller sends If-None-Match back to back from a thread of the bench process",
    ]
    return [res]
