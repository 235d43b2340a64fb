"""Size and scale: aggregator memory per file, watcher start-up, many idle watcher streams.

Memory is VmRSS from /proc/<pid>/status; CPU is utime + stime from
/proc/<pid>/stat over a window, as a percentage of one core.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import aiohttp

from bench.harness import (
    ROOT,
    AggregatorProc,
    Check,
    Context,
    CpuWindow,
    ScenarioResult,
    Table,
    child_env,
    http_get,
    human,
    hwm_bytes,
    rss_bytes,
    run_async,
    say,
    spawn_watcher,
    start_aggregator,
    summarize,
    wait_file_count,
)
from bench.synthetic import SyncStream, channel, heartbeat_msg, open_stream, prepared_snapshot

# ---------------------------------------------------------------- memory


async def _memory(ctx: Context, agg: AggregatorProc) -> dict[str, float]:
    n = ctx.sizes.memory_files
    out: dict[str, float] = {}
    snapshot = prepared_snapshot(n)
    await asyncio.sleep(ctx.sizes.settle)
    out["rss_empty"] = rss_bytes(agg.pid)
    chan = channel(agg.grpc_target)
    try:
        say(f"memory: loading {n:,} files")
        t0 = time.perf_counter()
        stream = await open_stream(chan, "memory-0", snapshot)
        out["load_seconds"] = time.perf_counter() - t0
        await asyncio.sleep(ctx.sizes.settle)
        out["rss_loaded"] = rss_bytes(agg.pid)
        http_get(agg.http_port, "/files/", {"Accept-Encoding": "identity"}, timeout=600)
        await asyncio.sleep(ctx.sizes.settle / 2)
        out["rss_after_plain_read"] = rss_bytes(agg.pid)
        http_get(agg.http_port, "/files/", {"Accept-Encoding": "gzip"}, timeout=600)
        await asyncio.sleep(ctx.sizes.settle / 2)
        out["rss_after_reads"] = rss_bytes(agg.pid)
        out["hwm"] = hwm_bytes(agg.pid)
        stream.cancel()
    finally:
        await chan.close()
    return out


def _allocation_profile(files: int) -> dict[str, Any]:
    """bench/memprofile.py in its own process: bytes per file by allocation site."""
    try:
        done = subprocess.run(
            [sys.executable, "bench/memprofile.py", str(files)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": "bench/memprofile.py timed out"}
    if done.returncode != 0:
        return {"error": f"bench/memprofile.py failed: {done.stderr[-1500:]}"}
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def run_memory(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """memory: aggregator RSS per file at 1M files."""
    n = ctx.sizes.memory_files
    if ctx.profile_dir is not None:  # a CPU profile says nothing here: where do the bytes go?
        files = min(n, 200_000)
        say(f"memory: tracemalloc over the aggregator's index code, {files:,} files")
        ctx.profiles.append({"label": f"memory:tracemalloc:{human(files)} files",
                             **_allocation_profile(files)})  # fmt: skip
        return []
    procs = ctx.procs("memory")
    try:
        agg = start_aggregator(procs, "aggregator")
        m = run_async(_memory(ctx, agg))
    finally:
        procs.stop_all()
    res = ScenarioResult(
        "memory",
        f"memory: aggregator RSS at {human(n)} files (one synthetic watcher, 20-byte names)",
        "<= 250 bytes per file",
    )
    base = m["rss_empty"]
    table = Table(["state", "RSS MB", "bytes/file over empty", "bytes/file (total RSS)"])
    for label, key in (
        ("empty", "rss_empty"),
        (f"{human(n)} files loaded", "rss_loaded"),
        ("after a plain GET /files/", "rss_after_plain_read"),
        ("after a gzip GET /files/ too", "rss_after_reads"),
        ("peak (VmHWM)", "hwm"),
    ):
        table.rows.append([label, m[key] / 1e6, (m[key] - base) / n, m[key] / n])
    res.tables.append(table)
    per_file = (m["rss_after_reads"] - base) / n
    res.figures.update(
        files=n,
        snapshot_load_seconds=m["load_seconds"],
        rss_bytes={k: v for k, v in m.items() if k != "load_seconds"},
        bytes_per_file_loaded=(m["rss_loaded"] - base) / n,
        bytes_per_file_serving=per_file,
        bytes_per_file_total_rss=m["rss_after_reads"] / n,
    )
    res.checks.append(
        Check("RSS per file, serving (loaded + cached bodies) over empty", per_file, 250, "B")
    )
    res.notes.append(
        f"names are 20 bytes, sizes and mtimes varied; snapshot load took {m['load_seconds']:.1f} s"
    )
    return [res]


# ---------------------------------------------------------------- start-up


def _log_time(stamp: object) -> float:
    assert isinstance(stamp, str)
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run_startup(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """startup: a watcher on a folder of 100k files -> its snapshot complete at the aggregator."""
    z = ctx.sizes
    n = z.startup_files
    folder = ctx.folder_with(n)
    procs = ctx.procs("startup")
    rows: list[dict[str, float]] = []
    try:
        agg = start_aggregator(procs, "aggregator")
        for trial in range(z.startup_trials):
            say(f"startup: trial {trial + 1}/{z.startup_trials}, {n:,} files")
            last = trial == z.startup_trials - 1  # profiled: the last trial, cache warm
            with ctx.profiled(agg.pid, "startup:aggregator:last trial", when=last):
                wall0, t0 = time.time(), time.monotonic()
                proc = spawn_watcher(
                    procs, f"watcher-{trial}", folder, agg.grpc_url, ["--name", f"startup-{trial}"]
                )
                with ctx.profiled(proc.pid, "startup:watcher:last trial", when=last):
                    t1 = wait_file_count(agg.http_port, n, 300, proc=proc)
            started = proc.wait_event("watcher_started")
            sent = proc.wait_event("snapshot_sent")
            rows.append(
                {
                    "total_s": t1 - t0,
                    "to_started_log_s": _log_time(started["timestamp"]) - wall0,
                    "scan_s": float(started["scan_seconds"]),
                    "snapshot_send_s": float(sent["seconds"]),
                    "sent_to_listed_s": t1 - t0 - (_log_time(sent["timestamp"]) - wall0),
                }
            )
            procs.stop(proc)
            wait_file_count(agg.http_port, 0, 120)
    finally:
        procs.stop_all()
    res = ScenarioResult(
        "startup",
        f"watcher start-up: folder of {human(n)} files -> its snapshot complete at the aggregator",
        "<= 2 s",
    )
    table = Table(
        [
            "trial",
            "total s",
            "process start -> started log s",
            "of which scan s",
            "snapshot send s",
            "sent -> all listed s",
        ]
    )
    for i, r in enumerate(rows, 1):
        table.rows.append(
            [
                i,
                r["total_s"],
                r["to_started_log_s"],
                r["scan_s"],
                r["snapshot_send_s"],
                r["sent_to_listed_s"],
            ]
        )
    s = summarize([r["total_s"] for r in rows])
    table.rows.append(["p50", s["p50"], "", "", "", ""])
    res.tables.append(table)
    res.figures.update(files=n, trials=rows, total_seconds=s)
    res.checks.append(Check("start-up p50", s["p50"], 2.0, "s"))
    res.notes.append(
        "total: from spawning `python -m watcher` to the aggregator's /healthz counting every "
        "file (polled every 5 ms); the folder is in the page cache after the first trial; "
        "'started log' and 'sent' times come from the watcher's log timestamps"
    )
    return [res]


# ---------------------------------------------------------------- many watchers


async def _heartbeats(stream: SyncStream, interval: float, until: float) -> int:
    """A heartbeat every `interval` s (random phase) until `until`, asking for no answer, as
    the watcher's own; returns how many."""
    beat = heartbeat_msg(stream.sequence, want_ack=False)
    await asyncio.sleep(random.uniform(0, interval))
    beats = 0
    while time.monotonic() < until:
        await stream.write(beat)
        beats += 1
        await asyncio.sleep(interval)
    return beats


async def _many(ctx: Context, agg: AggregatorProc) -> dict[str, float]:
    z = ctx.sizes
    n = z.many_streams
    out: dict[str, float] = {}
    await asyncio.sleep(z.settle)
    out["rss_before"] = rss_bytes(agg.pid)
    idle = CpuWindow([agg.pid])
    idle.start()
    await asyncio.sleep(min(5.0, z.many_window))
    out["idle_cpu_percent"] = idle.stop()[0]
    say(f"many watchers: opening {n} gRPC streams")
    channels = [channel(agg.grpc_target) for _ in range(n)]
    streams: list[SyncStream] = []
    try:
        for start in range(0, n, 50):
            part = channels[start : start + 50]
            streams += await asyncio.gather(
                *(open_stream(c, f"idle-{start + i:05d}") for i, c in enumerate(part))
            )
        await asyncio.sleep(z.settle)
        out["rss_connected"] = rss_bytes(agg.pid)
        say(f"many watchers: {z.many_window:g} s of heartbeats every {z.heartbeat_interval:g} s")
        cpu = CpuWindow([agg.pid, os.getpid()])
        with ctx.profiled(agg.pid, "many_watchers:aggregator:window"):
            cpu.start()
            until = time.monotonic() + z.many_window
            beats = await asyncio.gather(
                *(_heartbeats(s, z.heartbeat_interval, until) for s in streams)
            )
            agg_cpu, own_cpu = cpu.stop()
        out["rss_after_window"] = rss_bytes(agg.pid)
        await asyncio.gather(*(s.sync() for s in streams))  # every stream still served
        out["cpu_percent"] = agg_cpu
        out["bench_cpu_percent"] = own_cpu
        out["window_s"] = cpu.seconds
        out["heartbeats"] = float(sum(beats))
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{agg.http_port}/healthz"
            async with session.get(url) as resp:
                out["watchers_held"] = float((await resp.json())["watchers"])
        for s in streams:
            s.cancel()
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return out


def run_many(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """many_watchers: N idle gRPC streams with heartbeats: aggregator CPU and memory per stream."""
    z = ctx.sizes
    n = z.many_streams
    procs = ctx.procs("many")
    try:
        agg = start_aggregator(procs, "aggregator")
        m = run_async(_many(ctx, agg))
    finally:
        procs.stop_all()
    res = ScenarioResult(
        "many_watchers",
        f"many watchers: {n:,} idle gRPC watcher streams (own connection each, the watcher's "
        f"keepalive), heartbeat every {z.heartbeat_interval:g} s",
        "aggregator <= 5 % of a core; <= 50 KB per stream",
    )
    per_stream = (m["rss_connected"] - m["rss_before"]) / n
    per_stream_after = (m["rss_after_window"] - m["rss_before"]) / n
    table = Table(
        [
            "streams held",
            "agg CPU % (window)",
            "agg CPU % idle, no streams",
            "KB/stream",
            "KB/stream after window",
            "heartbeats/s",
            "bench CPU %",
        ]
    )
    table.rows.append(
        [
            int(m["watchers_held"]),
            m["cpu_percent"],
            m["idle_cpu_percent"],
            per_stream / 1024,
            per_stream_after / 1024,
            m["heartbeats"] / m["window_s"],
            m["bench_cpu_percent"],
        ]
    )
    res.tables.append(table)
    res.figures.update(
        streams=n,
        streams_held=m["watchers_held"],
        aggregator_cpu_percent=m["cpu_percent"],
        aggregator_idle_cpu_percent=m["idle_cpu_percent"],
        bytes_per_stream=per_stream,
        bytes_per_stream_after_window=per_stream_after,
        heartbeats_per_second=m["heartbeats"] / m["window_s"],
        window_seconds=m["window_s"],
        bench_cpu_percent=m["bench_cpu_percent"],
        rss_bytes={k: m[k] for k in ("rss_before", "rss_connected", "rss_after_window")},
    )
    res.checks += [
        Check("aggregator CPU, % of one core", m["cpu_percent"], 5.0, "%"),
        Check("memory per stream", max(per_stream, per_stream_after) / 1024, 50.0, "KB"),
    ]
    res.notes.append(
        "each stream: hello, empty snapshot, then a Heartbeat(sequence) every interval, unanswered "
        "as the watcher's are (one Heartbeat -> Ack per stream after the window checks that "
        "every stream is still served); memory per stream "
        "is the RSS growth over the aggregator before any stream, divided by the streams"
    )
    return [res]
