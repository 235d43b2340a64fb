"""GET /files/ at 10k / 100k / 1M files: unchanged index, and right after a single change.

One fresh aggregator per size, loaded by one synthetic gRPC watcher whose
snapshot travels in ~1 MiB chunks. Latency is measured by one client, one
request at a time; requests per second by several concurrent aiohttp clients
(one connection each) for a fixed duration. Bodies are read whole; plain
unless a row says gzip (compressed bytes are timed, not decompressed).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time

import aiohttp

from bench.harness import (
    AggregatorProc,
    BenchError,
    Check,
    Context,
    ScenarioResult,
    Table,
    human,
    run_async,
    say,
    start_aggregator,
    summarize,
)
from bench.synthetic import OP_ADD, OP_REMOVE, SyncStream, channel, open_stream, prepared_snapshot

PLAIN = {"Accept-Encoding": "identity"}
GZIP = {"Accept-Encoding": "gzip"}
MIN_SAMPLES = 5


async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> bytes:
    async with session.get(url, headers=headers) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise BenchError(f"GET {url} answered {resp.status}: {body[:200]!r}")
        return body


async def _series(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], count: int, budget: float
) -> list[float]:
    """Sequential GETs: `count` of them, fewer if `budget` seconds run out (at least 5)."""
    out: list[float] = []
    deadline = time.perf_counter() + budget
    while len(out) < count and (time.perf_counter() < deadline or len(out) < MIN_SAMPLES):
        t0 = time.perf_counter()
        await _get(session, url, headers)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _load(url: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    """`clients` concurrent readers for `seconds`: (requests per second, latencies ms)."""
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        await asyncio.gather(*(_get(session, url, PLAIN) for _ in range(clients)))  # connect
        stop_at = time.perf_counter() + seconds

        async def reader() -> list[float]:
            lat: list[float] = []
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await _get(session, url, PLAIN)
                lat.append((time.perf_counter() - t0) * 1000)
            return lat

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(reader() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies = [v for lat in per_client for v in lat]
    return len(latencies) / elapsed, latencies


async def _curl_series(url: str, count: int) -> list[float]:
    """`count` sequential GETs by curl (a C client) on one connection: its time_total, ms."""
    curl = shutil.which("curl")
    if curl is None:
        return []
    args = ["-s", "-H", "Accept-Encoding: identity", "-w", "%{time_total}\n"]
    for _ in range(count):
        args += ["-o", "/dev/null", url]
    proc = await asyncio.create_subprocess_exec(
        curl, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 600)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError("curl did not finish in 600 s") from None
    if proc.returncode != 0:
        raise BenchError(f"curl exited {proc.returncode}")
    return [float(t) * 1000 for t in out.decode().split()]


def _change_file(i: int) -> tuple[bytes, int, int]:
    """A file at a random place in the sort order."""
    return (b"%08x-change-%05d.jpg" % (random.getrandbits(32), i), i, 1_700_000_000_000_000_000)


READ_TTL = 3600
"""The aggregator's --ttl here, in seconds."""


class _Toggler:
    """One file that a synthetic watcher adds, then removes, then adds...: single changes."""

    def __init__(self, stream: SyncStream) -> None:
        self.stream = stream
        self.pending: tuple[bytes, int, int] | None = None
        self.count = 0

    async def change(self) -> None:
        """Send one change and return once the aggregator has applied it."""
        if self.pending is None:
            self.count += 1
            self.pending = _change_file(self.count)
            await self.stream.write(self.stream.next_batch([(OP_ADD, self.pending)]))
        else:
            await self.stream.write(self.stream.next_batch([(OP_REMOVE, self.pending)]))
            self.pending = None
        await self.stream.sync()  # applied when the Ack comes back


async def _after_changes(
    ctx: Context, session: aiohttp.ClientSession, url: str, stream: SyncStream
) -> dict[str, list[float]]:
    """Single changes, each applied before one GET /files/ is timed (aiohttp, then curl)."""
    z = ctx.sizes
    out: dict[str, list[float]] = {"after": [], "cached": [], "curl_after": []}
    toggler = _Toggler(stream)
    deadline = time.perf_counter() + z.after_change_seconds
    for _ in range(z.after_change_trials):
        if time.perf_counter() > deadline and len(out["after"]) >= MIN_SAMPLES:
            break
        await toggler.change()
        t0 = time.perf_counter()
        await _get(session, url, PLAIN)
        t1 = time.perf_counter()
        await _get(session, url, PLAIN)
        out["after"].append((t1 - t0) * 1000)
        out["cached"].append((time.perf_counter() - t1) * 1000)
        await toggler.change()
        out["curl_after"] += await _curl_series(url, 1)
    return out


async def _at_size(
    ctx: Context, agg: AggregatorProc, n: int, unchanged: bool, after_change: bool
) -> dict[str, object]:
    z = ctx.sizes
    chan = channel(agg.grpc_target)
    out: dict[str, object] = {}
    try:
        say(f"read: loading {n:,} files")
        snapshot = prepared_snapshot(n)
        t0 = time.perf_counter()
        stream = await open_stream(chan, "read-0", snapshot)
        out["load_seconds"] = time.perf_counter() - t0
        url = f"http://127.0.0.1:{agg.http_port}/files/"
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            t0 = time.perf_counter()
            body = await _get(session, url, PLAIN)
            out["first_read_ms"] = (time.perf_counter() - t0) * 1000
            out["body_bytes"] = len(body)
            listed = body.count(b'{"filename":')
            if listed != n:
                raise BenchError(f"GET /files/ listed {listed} files, not {n}")
            if unchanged:
                say(f"read: {n:,} files, latency and {z.read_clients} concurrent readers")
                with ctx.profiled(agg.pid, f"read:aggregator:{human(n)} files"):
                    out["plain"] = await _series(
                        session, url, PLAIN, z.read_samples, z.read_series_seconds
                    )
                    gz_first = time.perf_counter()
                    gz = await _get(session, url, GZIP)
                    out["gzip_first_ms"] = (time.perf_counter() - gz_first) * 1000
                    out["gzip_bytes"] = len(gz)
                    out["gzip"] = await _series(
                        session, url, GZIP, z.read_samples, z.read_series_seconds
                    )
                    rps, under_load = await _load(url, z.read_clients, z.read_rps_seconds)
                    out["curl"] = await _curl_series(url, min(z.read_samples, 50))
                out["rps"] = rps
                out["under_load"] = under_load
            if after_change:
                say(f"read after a single change: {n:,} files")
                with ctx.profiled(agg.pid, f"read_after_change:aggregator:{human(n)} files"):
                    out.update(await _after_changes(ctx, session, url, stream))
        stream.cancel()
    finally:
        await chan.close()
    return out


def run_read(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """read and read_after_change, sharing one loaded aggregator per size."""
    z = ctx.sizes
    want_read = "read" in selected
    want_after = "read_after_change" in selected
    sizes = sorted(
        {*(z.read_sizes if want_read else ()), *(z.read_after_sizes if want_after else ())}
    )
    measured: dict[int, dict[str, object]] = {}
    for n in sizes:
        procs = ctx.procs(f"read-{human(n)}")
        try:
            # The synthetic watcher sends no heartbeat while the reads run (tens of
            # seconds at 1M files): a TTL longer than the scenario keeps its files.
            agg = start_aggregator(procs, "aggregator", ["--ttl", str(READ_TTL)])
            measured[n] = run_async(
                _at_size(
                    ctx,
                    agg,
                    n,
                    want_read and n in z.read_sizes,
                    want_after and n in z.read_after_sizes,
                )
            )
        finally:
            procs.stop_all()
    results = []
    if want_read:
        results.append(_read_result(ctx, measured))
    if want_after:
        results.append(_after_result(ctx, measured))
    return results


CLIENTS_NOTE = (
    "curl: a C client (one process, one keep-alive connection), the closest to the server's "
    "own time, judged when installed; aiohttp: a Python client in the bench process, whose "
    "reading of a large body costs more than the server's sending of it"
)


def _judged(curl: dict[str, float], aio: dict[str, float]) -> tuple[str, float]:
    return ("curl", curl["p50"]) if curl["n"] else ("aiohttp", aio["p50"])


def _read_result(ctx: Context, measured: dict[int, dict[str, object]]) -> ScenarioResult:
    z = ctx.sizes
    res = ScenarioResult(
        "read",
        "GET /files/ with the index unchanged",
        "p50 at 100k <= 5 ms; at 1M <= 50 ms (and requests per second, reported)",
    )
    table = Table(
        [
            "files",
            "body MB",
            "load s",
            "first ms",
            "curl n",
            "curl p50 ms",
            "curl p99 ms",
            "aiohttp n",
            "aiohttp p50 ms",
            "aiohttp p99 ms",
            "gzip MB",
            "gzip p50 ms",
            f"req/s ({z.read_clients} aiohttp)",
            "p50 under load ms",
        ]
    )
    for n in z.read_sizes:
        m = measured[n]
        plain, gz, load, curl = (_floats(m[k]) for k in ("plain", "gzip", "under_load", "curl"))
        p, g, u, c = summarize(plain), summarize(gz), summarize(load), summarize(curl)
        table.rows.append(
            [
                human(n),
                _mb(m["body_bytes"]),
                m["load_seconds"],
                m["first_read_ms"],
                c["n"],
                c["p50"],
                c["p99"],
                p["n"],
                p["p50"],
                p["p99"],
                _mb(m["gzip_bytes"]),
                g["p50"],
                m["rps"],
                u["p50"],
            ]
        )
        res.figures[f"files_{n}"] = {
            "body_bytes": m["body_bytes"],
            "snapshot_load_seconds": m["load_seconds"],
            "first_read_ms": m["first_read_ms"],
            "curl_ms": c,
            "aiohttp_ms": p,
            "gzip_bytes": m["gzip_bytes"],
            "gzip_first_ms": m["gzip_first_ms"],
            "gzip_aiohttp_ms": g,
            "requests_per_second": m["rps"],
            "clients": z.read_clients,
            "under_load_ms": u,
        }
    res.tables.append(table)
    for n, limit in zip(z.read_sizes[1:], (5.0, 50.0), strict=True):
        m = measured[n]
        client, p50 = _judged(summarize(_floats(m["curl"])), summarize(_floats(m["plain"])))
        res.checks.append(
            Check(f"GET /files/ p50 at {human(n)} files ({client})", p50, limit, "ms")
        )
    res.notes += [
        CLIENTS_NOTE,
        "gzip and req/s: aiohttp; first ms: the first GET after the load; load s: the snapshot "
        "from its first chunk to its Ack; clients and aggregator share the CPUs",
    ]
    return res


def _after_result(ctx: Context, measured: dict[int, dict[str, object]]) -> ScenarioResult:
    z = ctx.sizes
    res = ScenarioResult(
        "read_after_change",
        "GET /files/ right after a single change (add or remove of one file, applied)",
        "p50 at 100k <= 10 ms; at 1M <= 150 ms",
    )
    table = Table(
        [
            "files",
            "curl n",
            "curl p50 ms",
            "curl p90 ms",
            "curl p99 ms",
            "aiohttp n",
            "aiohttp p50 ms",
            "aiohttp p99 ms",
            "next GET p50 ms (aiohttp)",
        ]
    )
    for n in z.read_after_sizes:
        m = measured[n]
        c, a, nxt = (summarize(_floats(m[k])) for k in ("curl_after", "after", "cached"))
        table.rows.append(
            [
                human(n),
                c["n"],
                c["p50"],
                c["p90"],
                c["p99"],
                a["n"],
                a["p50"],
                a["p99"],
                nxt["p50"],
            ]
        )
        res.figures[f"files_{n}"] = {
            "curl_after_change_ms": c,
            "aiohttp_after_change_ms": a,
            "aiohttp_next_get_ms": nxt,
        }
    res.tables.append(table)
    for n, limit in zip(z.read_after_sizes, (10.0, 150.0), strict=True):
        m = measured[n]
        client, p50 = _judged(summarize(_floats(m["curl_after"])), summarize(_floats(m["after"])))
        res.checks.append(
            Check(f"p50 right after a change at {human(n)} files ({client})", p50, limit, "ms")
        )
    res.notes += [
        CLIENTS_NOTE,
        "each change is one batch from the synthetic watcher, confirmed applied "
        "(heartbeat -> Ack) before the GET is timed; names land at random places in the order; "
        "curl and aiohttp trials alternate, each after its own change",
    ]
    return res


def _floats(value: object) -> list[float]:
    assert isinstance(value, list)
    return [float(v) for v in value]


def _mb(value: object) -> float:
    assert isinstance(value, int)
    return value / 1e6
