"""Ingest: synthetic gRPC watchers send batches as fast as the aggregator takes them.

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
import time

from bench.harness import (
    AggregatorProc,
    BenchError,
    Check,
    Context,
    CpuWindow,
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
