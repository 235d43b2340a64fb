"""Hostile and odd legacy peers, found by a red-team trial, played over real sockets.

Each test drives a real aggregator process the way the trial did: a fake Go watcher
(tests.legacy.conftest) or a hostile HTTP server answering the aggregator's fetch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.legacy.conftest import (
    GAP_WAIT,
    SYNC_TIMEOUT,
    AggregatorFactory,
    AggregatorProc,
    FakeGoFactory,
    FakeGoWatcher,
    Processes,
    go_json,
)
from tests.support import HOST, http_request, wait_for_async

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AggregatorProc]:
    """One aggregator for the module (--ttl 3, --gap-wait 0.3)."""
    p = Processes(tmp_path_factory.mktemp("legacy-hostile-aggregator"))
    try:
        yield p.start_aggregator("--fetch-timeout", "1")
    finally:
        p.stop_all()


async def wait_listed(
    fake: FakeGoWatcher, expected: list[str], timeout: float = SYNC_TIMEOUT
) -> None:
    """Poll until the aggregator lists exactly `expected` (sorted) for the fake."""
    await wait_for_async(
        fake.listed,
        timeout,
        until=lambda names: names == sorted(expected),
        what=f"{fake.node} to list {sorted(expected)}",
    )


def error_count(agg: AggregatorProc, kind: str) -> float:
    """filewatch ingestion errors of one kind, from /metrics."""
    text = http_request(agg.http_port, "GET", "/metrics").body.decode()
    prefix = f'filewatch_ingestion_errors_total{{kind="{kind}"}} '
    return sum(
        float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)
    )


async def hellos(fake: FakeGoWatcher, count: int, period: float) -> None:
    """`count` hellos, `period` apart: the watcher's own hello ticker."""
    for i in range(count):
        if i:
            await asyncio.sleep(period)  # the ticker's period, not a wait for a condition
        assert (await fake.hello()).status == 200


# ---------------------------------------------------------------- poison seqnos


async def test_a_far_future_seqno_for_a_live_instance_is_refused_and_fetches_nothing(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    reply = await fake.patch(fake.op("add", "poison.txt", 2**63 - 1))
    assert reply.status == 400, reply
    assert "seqno" in reply.json()["detail"]
    # The next changes still flow, and no hello refetches the list.
    assert (await fake.patch(fake.change("add", "b.txt"))).status == 200
    await wait_listed(fake, ["a.txt", "b.txt"])
    await hellos(fake, 4, GAP_WAIT)
    assert await fake.listed() == ["a.txt", "b.txt"]
    assert len(fake.fetches) == 1


async def test_a_poison_seqno_held_before_the_first_hello_is_dropped_at_install(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    before = error_count(agg, "legacy_implausible_seqno")
    # Before its hello its position is unknown: held, answered 200, as the spec says.
    assert (await fake.patch(fake.op("add", "poison.txt", 2**63 - 1))).status == 200
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    assert error_count(agg, "legacy_implausible_seqno") == before + 1
    # No gap is left open: hellos over several gap waits fetch nothing more.
    await hellos(fake, 5, GAP_WAIT)
    assert len(fake.fetches) == 1


async def test_a_gap_that_a_refetch_does_not_close_backs_off(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    """A seqno within bounds but ahead of every list the watcher gives: refetches back off."""
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    before = error_count(agg, "legacy_gap_unclosed")
    assert (await fake.patch(fake.op("add", "ahead.txt", 1000))).status == 200
    # Waits of 0.3, 0.6, 1.2, 2.4 s: four refetches in 4.5 s + their own time, not 15.
    # The window is fixed; the fake says hello meanwhile, as a live watcher does.
    await hellos(fake, 16, GAP_WAIT)
    assert 2 <= len(fake.fetches) - 1 <= 5, fake.fetches
    assert error_count(agg, "legacy_gap_unclosed") >= before + 2
    unclosed = [e for e in agg.proc.events("legacy_gap_unclosed") if e.get("node") == fake.node]
    assert len(unclosed) == 1  # logged once, counted every time
    assert await fake.listed() == ["a.txt"]


# ---------------------------------------------------------------- bye


async def test_a_forged_bye_is_refuted_by_the_hellos_that_keep_coming(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt", "b.txt"])
    await hellos(fake, 2, GAP_WAIT)  # its hello period: 0.3 s
    await wait_listed(fake, ["a.txt", "b.txt"])
    before = error_count(agg, "legacy_bye_contradicted")
    assert (await fake.bye()).status == 200  # forged: the watcher lives on
    assert await fake.listed() == []  # a bye acts at once
    assert (await fake.hello()).status == 200  # could be the one that races a real bye
    assert await fake.listed() == []
    # Its ticker goes on: half a period later the bye is refuted.
    start = time.monotonic()
    while await fake.listed() != ["a.txt", "b.txt"]:
        assert time.monotonic() - start < SYNC_TIMEOUT, "never listed again"
        await hellos(fake, 2, GAP_WAIT)
    assert error_count(agg, "legacy_bye_contradicted") == before + 1
    assert any(
        e.get("instance") == fake.instance for e in agg.proc.events("legacy_bye_contradicted")
    )


# ---------------------------------------------------------------- names


async def test_an_ambiguous_remove_never_drops_a_file_the_watcher_still_lists(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    """caf\\xff.x and caf\\xfe.x both reach us as "caf\\ufffd.x" from the Go watcher."""
    fake = await fake_go(agg.http_port, ["caf\ufffd.x", "plain.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["caf\ufffd.x", "plain.txt"])
    # One of the two files goes; the Go watcher's list still names the other.
    fake.seqno += 1
    assert (await fake.patch(fake.op("remove", "caf\ufffd.x", fake.seqno))).status == 200

    async def fetches() -> int:
        return len(fake.fetches)

    await wait_for_async(fetches, SYNC_TIMEOUT, until=lambda n: n == 2, what="a confirming fetch")
    await asyncio.sleep(GAP_WAIT)  # any wrong removal would show within this
    assert await fake.listed() == ["caf\ufffd.x", "plain.txt"]
    # Then the other one goes too: the confirming fetch removes it.
    assert (await fake.patch(fake.change("remove", "caf\ufffd.x"))).status == 200
    await wait_listed(fake, ["plain.txt"])
    # A plain name's remove needs no fetch.
    assert (await fake.patch(fake.change("remove", "plain.txt"))).status == 200
    await wait_listed(fake, [])
    assert len(fake.fetches) == 3


async def test_escaped_undecodable_bytes_in_a_list_are_names_not_errors(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    """The aggregator's own escape (\\udcXX) in a watcher's list parses back to the bytes."""
    fake = await fake_go(agg.http_port, ["caf\udcff.x", "caf\udcfe.x"])
    assert b"\\udcff" in go_json(["caf\udcff.x"])  # what its GET /files sends
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["caf\udcfe.x", "caf\udcff.x"])
    reply = http_request(agg.http_port, "GET", "/files/")
    assert b'"caf\\udcfe.x"' in reply.body and b'"caf\\udcff.x"' in reply.body


# ---------------------------------------------------------------- expiry


async def test_a_ttl_shorter_than_the_hello_period_does_not_make_a_watcher_flap(
    start_aggregator: AggregatorFactory, fake_go: FakeGoFactory
) -> None:
    agg = start_aggregator("--ttl", "0.4", "--legacy-hello-period", "0.8")
    fake = await fake_go(agg.http_port, ["a.txt"])
    await hellos(fake, 2, 0.8)  # a period twice the TTL
    await wait_listed(fake, ["a.txt"])
    for _ in range(3):  # three periods, each longer than the TTL
        await hellos(fake, 1, 0)
        last = time.monotonic()
        for _ in range(8):
            assert await fake.listed() == ["a.txt"]
            await asyncio.sleep(0.1)
    await wait_listed(fake, [], timeout=10)
    # Gone after 3 missed periods of 0.8 s, not after the 0.4 s TTL.
    assert time.monotonic() - last >= 3 * 0.8 - 0.5
    assert len(fake.fetches) == 1
    assert agg.proc.count("watcher_expired") == 1


# ---------------------------------------------------------------- hostile fetches


class HostileLister:
    """A watcher port whose GET /files never ends, or announces 2 GiB."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/files", self._files)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def _files(self, request: web.Request) -> web.StreamResponse:
        self.started += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.mode == "length":
            resp.content_length = 2**31
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b'{"instance":"x","files":[' + b'{"filename":"aaaaaaaaaaaaaaaa"},' * 30_000
        try:
            for _ in range(2000):  # up to ~2 GB; the aggregator hangs up long before
                await resp.write(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return resp


@pytest.fixture
async def hostile() -> AsyncIterator[list[HostileLister]]:
    servers: list[HostileLister] = []
    try:
        yield servers
    finally:
        for s in servers:
            if s.runner is not None:
                await s.runner.cleanup()


def vm_kib(pid: int, field: str) -> int:
    """A VmRSS / VmHWM figure of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def test_hostile_list_fetches_stop_at_the_cap_and_take_turns(
    start_aggregator: AggregatorFactory,
    fake_go: FakeGoFactory,
    hostile: list[HostileLister],
) -> None:
    cap = 32 * MIB
    agg = start_aggregator(
        "--max-list-bytes", str(cap), "--max-fetches", "2", "--fetch-timeout", "20"
    )
    base = vm_kib(agg.proc.pid, "VmRSS")
    for mode in ("chunked", "length", "chunked", "length"):
        server = HostileLister(mode)
        await server.start()
        hostile.append(server)
        fake = await fake_go(agg.http_port, [])
        fake.port = server.port  # its hello names the hostile port
        assert (await fake.hello()).status == 200

    async def failed() -> int:  # the hostile servers run on this loop: never block it
        return agg.proc.count("legacy_fetch_failed")

    await wait_for_async(failed, 30, until=lambda n: n >= 4, what="four hostile fetches to fail")
    failures = agg.proc.events("legacy_fetch_failed")
    assert all("--max-list-bytes" in e["error"] for e in failures), failures
    peak = vm_kib(agg.proc.pid, "VmHWM")
    # Two bodies of at most the cap in memory at once, plus working room.
    growth_mib = (peak - base) / 1024
    print(f"peak RSS growth under 4 hostile fetches (cap 32 MiB, 2 at once): {growth_mib:.0f} MiB")
    assert growth_mib < 2 * cap / MIB * 1.5 + 32, growth_mib
    # A well-behaved watcher is served meanwhile and after.
    good = await fake_go(agg.http_port, ["good.txt"])
    assert (await good.hello()).status == 200
    await wait_listed(good, ["good.txt"])
