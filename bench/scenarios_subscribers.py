"""subscribers: what live readers cost the aggregator (WatchFiles and GET /files/events).

For each count K, K subscribers of one kind are opened; then one synthetic
watcher sends one change per batch at a fixed rate for a window. Measured:
the aggregator's CPU (% of one core) and RSS per subscriber, and the lag from
a batch written to its event received by one probe subscriber, opened last
(so it is served after every other one). A capacity figure for
docs/scaling.md, not a target of an issue.
"""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import grpc

from bench.harness import (
    HOST,
    AggregatorProc,
    BenchError,
    Context,
    CpuWindow,
    ScenarioResult,
    Table,
    rss_bytes,
    run_async,
    say,
    start_aggregator,
    summarize,
)
from bench.synthetic import OP_ADD, OP_REMOVE, SyncStream, channel, open_stream, synthetic_files
from gen import filewatch_pb2 as pb

RATE = 100
"""Changes per second the synthetic watcher sends (one per batch)."""
WATCH_FILES = "/filewatch.v1.FileIndex/WatchFiles"


def _raw(data: bytes) -> bytes:
    return data


class _Subscribers:
    """K subscribers of one kind that count what they receive, and one probe that parses."""

    def __init__(self, agg: AggregatorProc, kind: str) -> None:
        self.agg = agg
        self.kind = kind
        self.received = 0
        self.arrivals: dict[bytes, int] = {}  # probe: file name -> monotonic_ns of its add
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[grpc.aio.Channel] = []
        self.session: aiohttp.ClientSession | None = None

    async def open(self, count: int) -> None:
        """Open `count` counting subscribers and the probe; return once all are streaming."""
        ready = [asyncio.Event() for _ in range(count + 1)]
        if self.kind == "sse":
            connector = aiohttp.TCPConnector(limit=0)
            self.session = aiohttp.ClientSession(connector=connector)
        for i, ev in enumerate(ready):
            probe = i == count
            self.tasks.append(asyncio.create_task(self._run(ev, probe)))
        try:
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in ready)), 120)
        except TimeoutError:
            raise BenchError(f"{count} {self.kind} subscribers did not all open in 120 s") from None
        for task in self.tasks:
            if task.done():
                task.result()
                raise BenchError(f"a {self.kind} subscriber ended early")

    async def _run(self, ready: asyncio.Event, probe: bool) -> None:
        if self.kind == "grpc":
            await self._watch_files(ready, probe)
        else:
            await self._events(ready, probe)

    async def _watch_files(self, ready: asyncio.Event, probe: bool) -> None:
        chan = grpc.aio.insecure_channel(self.agg.grpc_target)
        self.channels.append(chan)
        request = pb.WatchFilesRequest(max_events_per_message=1000)
        if probe:
            stub = chan.unary_stream(
                WATCH_FILES,
                request_serializer=pb.WatchFilesRequest.SerializeToString,
                response_deserializer=pb.WatchFilesResponse.FromString,
            )
            async for resp in stub(request):
                now = time.monotonic_ns()
                kind = resp.WhichOneof("kind")
                if kind == "list":
                    if resp.list.done:
                        ready.set()
                    continue
                events = resp.events.events if kind == "events" else (resp.event,)
                for ev in events:
                    if ev.kind == pb.FileEvent.KIND_ADDED:
                        self.arrivals.setdefault(ev.entry.raw_name, now)
            return
        raw = chan.unary_stream(
            WATCH_FILES,
            request_serializer=pb.WatchFilesRequest.SerializeToString,
            response_deserializer=_raw,
        )
        async for data in raw(request):
            ready.set()
            self.received += len(data)

    async def _events(self, ready: asyncio.Event, probe: bool) -> None:
        assert self.session is not None
        url = f"http://{HOST}:{self.agg.http_port}/files/events"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            if resp.status != 200:
                raise BenchError(f"GET /files/events answered {resp.status}")
            event = ""
            async for line in resp.content:
                ready.set()
                self.received += len(line)
                if not probe:
                    continue
                if line.startswith(b"event: "):
                    event = line[7:].strip().decode()
                elif line.startswith(b"data: ") and event == "add":
                    now = time.monotonic_ns()
                    name = line.split(b'"filename":"', 1)[1].split(b'"', 1)[0]
                    self.arrivals.setdefault(name, now)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for chan in self.channels:
            await chan.close()
        if self.session is not None:
            await self.session.close()


async def _window(
    agg: AggregatorProc, stream: SyncStream, subs: _Subscribers, seconds: float
) -> dict[str, float]:
    """Send RATE one-change batches per second for `seconds`; CPU, RSS and probe lags."""
    sent: dict[bytes, int] = {}
    rss0 = rss_bytes(agg.pid)
    cpu = CpuWindow([agg.pid, os.getpid()])
    cpu.start()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        (file,) = synthetic_files(1, n // 2, b"sub-")
        op = OP_ADD if n % 2 == 0 else OP_REMOVE
        if op == OP_ADD:
            sent[file[0]] = time.monotonic_ns()
        await stream.write(stream.next_batch([(op, file)]))
        n += 1
        await asyncio.sleep(max(0.0, t0 + n / RATE - time.monotonic()))
    await stream.sync()
    deadline = time.monotonic() + 30
    while len(subs.arrivals) < len(sent) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    agg_cpu, own_cpu = cpu.stop()
    lags = [(subs.arrivals[n] - t) / 1e6 for n, t in sent.items() if n in subs.arrivals]
    if len(lags) < len(sent):
        raise BenchError(f"the probe saw {len(lags)} of {len(sent)} adds")
    s = summarize(lags)
    return {
        "aggregator_cpu_percent": agg_cpu,
        "bench_cpu_percent": own_cpu,
        "lag_p50_ms": s["p50"],
        "lag_p99_ms": s["p99"],
        "rss_bytes": float(rss_bytes(agg.pid)),
        "rss_growth_bytes": float(rss_bytes(agg.pid) - rss0),
        "changes": float(n),
    }


async def _measure(ctx: Context, agg: AggregatorProc) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    chan = channel(agg.grpc_target)
    try:
        idle_rss = rss_bytes(agg.pid)
        for kind in ("grpc", "sse"):
            for count in ctx.sizes.subscriber_counts:
                label = "WatchFiles" if kind == "grpc" else "/files/events"
                say(f"subscribers: {count:,} {label} + 1 probe, {RATE} changes/s")
                subs = _Subscribers(agg, kind)
                try:
                    await subs.open(count)
                    held = rss_bytes(agg.pid)
                    # A fresh source per window: an idle stream would outlive its TTL.
                    stream = await open_stream(chan, f"source-{kind}-{count}")
                    figures = await _window(agg, stream, subs, ctx.sizes.subscriber_window)
                    await stream.goodbye()
                finally:
                    await subs.close()
                figures["bytes_per_subscriber"] = (held - idle_rss) / (count + 1)
                figures["subscribers"] = float(count + 1)
                out[f"{kind}_{count}"] = figures
    finally:
        await chan.close()
    return out


def run_subscribers(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """subscribers: WatchFiles and /files/events streams at a steady change rate."""
    del selected
    procs = ctx.procs("subscribers")
    try:
        # Limits above the largest count (the defaults are 1,000 of each, 1,024 connections).
        limits = [
            "--max-readers",
            "5000",
            "--max-event-clients",
            "5000",
            "--max-connections",
            "5000",
        ]
        agg = start_aggregator(procs, "aggregator", limits)
        measured = run_async(_measure(ctx, agg))
    finally:
        procs.stop_all()
    res = ScenarioResult(
        "subscribers",
        f"live subscribers at {RATE} changes/s (one per batch): the aggregator's CPU, memory "
        "per subscriber, and the lag to a probe subscriber opened last",
        "reported (a capacity figure for docs/scaling.md)",
    )
    table = Table(
        ["subscribers", "kind", "aggregator CPU %", "KB each", "probe lag p50 ms", "p99 ms"]
    )
    for key, f in measured.items():
        kind = "WatchFiles" if key.startswith("grpc") else "/files/events"
        table.rows.append(
            [
                int(f["subscribers"]),
                kind,
                f["aggregator_cpu_percent"],
                round(f["bytes_per_subscriber"] / 1000, 1),
                f["lag_p50_ms"],
                f["lag_p99_ms"],
            ]
        )
    res.tables.append(table)
    res.figures.update(measured)
    res.notes.append(
        "subscribers are in the bench process (asyncio, counting bytes without parsing); the "
        "probe parses; KB each: the aggregator's RSS with them open over its RSS before"
    )
    return [res]
