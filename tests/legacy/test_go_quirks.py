"""The original Go watcher's faults, played over the wire by a fake Go watcher.

The fake serves `GET /files` from this test's event loop and sends exactly the Go
watcher's requests; one aggregator (--fetch-timeout 0.5) is shared by the module,
each fake is its own node ("127.0.0.1:<its port>") and every check filters on it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.legacy.conftest import (
    GAP_WAIT,
    SYNC_TIMEOUT,
    TTL,
    AggregatorProc,
    FakeGoFactory,
    FakeGoWatcher,
    FetchMode,
    Processes,
    async_request,
    go_json,
)
from tests.support import HOST, wait_for_async

FETCH_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AggregatorProc]:
    """One aggregator for the module: fetches time out after 0.5 s."""
    p = Processes(tmp_path_factory.mktemp("legacy-quirks-aggregator"))
    try:
        yield p.start_aggregator("--fetch-timeout", str(FETCH_TIMEOUT))
    finally:
        p.stop_all()


async def wait_listed(
    fake: FakeGoWatcher, expected: list[str], timeout: float = SYNC_TIMEOUT
) -> None:
    """Poll until the aggregator lists exactly `expected` (sorted) for the fake."""
    shown = sorted(expected) if len(expected) <= 10 else f"{len(expected)} files"
    await wait_for_async(
        fake.listed,
        timeout,
        until=lambda names: names == sorted(expected),
        what=f"{fake.node} to list {shown}",
    )


async def hello_until_listed(
    fake: FakeGoWatcher, expected: list[str], timeout: float = SYNC_TIMEOUT
) -> None:
    """Say hello every 0.2 s (the Go watcher: every 5 s) until `expected` is listed."""
    deadline = time.monotonic() + timeout
    listed: list[str] = []
    while time.monotonic() < deadline:
        assert (await fake.hello()).status == 200
        for _ in range(10):
            listed = await fake.listed()
            if listed == sorted(expected):
                return
            await asyncio.sleep(0.02)
    pytest.fail(f"{fake.node} never listed {sorted(expected)}; last: {listed}", pytrace=False)


def snapshot_installed(agg: AggregatorProc, node: str) -> list[dict[str, Any]]:
    """The aggregator's log lines of snapshots installed for `node`."""
    return [e for e in agg.proc.events("legacy_snapshot_installed") if e.get("node") == node]


# ---------------------------------------------------------------- start-up order


async def test_patches_before_the_first_hello_are_held_then_applied(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    fake.listing = (["a.txt"], 1)  # its list as of the scan
    assert (await fake.patch(fake.op("add", "b.txt", 2))).status == 200
    assert (await fake.patch(fake.op("remove", "a.txt", 3))).status == 200
    assert await fake.listed() == []  # no hello yet: nothing to fetch from
    assert fake.fetches == []
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["b.txt"])
    assert len(fake.fetches) == 1


async def test_a_late_first_hello_is_fine(agg: AggregatorProc, fake_go: FakeGoFactory) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    fake.listing = (["a.txt"], 1)
    assert (await fake.patch(fake.op("add", "b.txt", 2))).status == 200
    # The Go watcher's first hello comes 5 s after it starts; here 1 s (< the TTL
    # that bounds how long PATCHes of an unknown instance are held).
    await asyncio.sleep(1.0)
    assert await fake.listed() == []
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt", "b.txt"])
    assert (await fake.patch(fake.op("add", "c.txt", 3))).status == 200
    await wait_listed(fake, ["a.txt", "b.txt", "c.txt"])


# ---------------------------------------------------------------- going away


async def test_no_bye_files_go_after_the_ttl(agg: AggregatorProc, fake_go: FakeGoFactory) -> None:
    fake = await fake_go(agg.http_port, ["a.txt", "b.txt"])
    assert (await fake.hello()).status == 200
    last_hello = time.monotonic()
    await wait_listed(fake, ["a.txt", "b.txt"])
    await asyncio.sleep(1.0)  # crashed (no bye): still listed well within the TTL
    assert await fake.listed() == ["a.txt", "b.txt"]
    await wait_listed(fake, [], timeout=TTL + 3)
    assert time.monotonic() - last_hello >= TTL - 0.2


async def test_an_evicted_instance_is_listed_again_at_its_next_hello(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    """A network cut longer than the TTL: once its hellos come back, it is fetched again.

    The aggregator lost this instance (it did not say bye); the next hello must bring
    its list back at once, not after another TTL (fetch "an instance the
    aggregator lost").
    """
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    await wait_listed(fake, [], timeout=TTL + 3)  # evicted
    fake.change("add", "b.txt")  # its PATCH was lost in the cut too
    back = time.monotonic()
    await hello_until_listed(fake, ["a.txt", "b.txt"], timeout=TTL + 3)
    assert time.monotonic() - back < 1.0, "listed again only after another TTL"
    assert len(fake.fetches) == 2


async def test_hello_and_patch_after_bye_are_answered_200_and_ignored(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    assert (await fake.bye()).status == 200
    assert await fake.listed() == []  # at once: no poll
    assert (await fake.hello()).status == 200
    assert (await fake.patch(fake.change("add", "z.txt"))).status == 200
    assert (await fake.hello()).status == 200
    await asyncio.sleep(0.5)  # nothing may come back
    assert await fake.listed() == []
    assert len(fake.fetches) == 1


async def test_restart_on_the_same_port_replaces_the_old_instance(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt", "b.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt", "b.txt"])
    old = fake.instance
    fake.restart(["b.txt", "c.txt"])  # killed (no bye) and started again: a new instance
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["b.txt", "c.txt"])
    # The old instance's late PATCH is ignored.
    assert (await fake.patch(fake.op("add", "old.txt", 2, instance=old))).status == 200
    assert (await fake.patch(fake.change("add", "d.txt"))).status == 200
    await wait_listed(fake, ["b.txt", "c.txt", "d.txt"])


# ---------------------------------------------------------------- odd operations


async def test_remove_of_unknown_and_add_of_listed_names_change_nothing(
    agg: AggregatorProc, fake_go: FakeGoFactory, session: aiohttp.ClientSession
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    before = await async_request(session, "GET", f"http://{HOST}:{agg.http_port}/files/?detail=1")
    mine_before = [e for e in before.json()["files"] if e["node"] == fake.node]
    assert (await fake.patch(fake.op("remove", "never-added.txt", 2))).status == 200
    assert (await fake.patch(fake.op("add", "a.txt", 3))).status == 200
    # Both were applied in order (no gap): seqno 4 follows at once.
    assert (await fake.patch(fake.op("add", "b.txt", 4))).status == 200
    await wait_listed(fake, ["a.txt", "b.txt"])
    after = await async_request(session, "GET", f"http://{HOST}:{agg.http_port}/files/?detail=1")
    mine_after = [e for e in after.json()["files"] if e["node"] == fake.node]
    assert [e for e in mine_after if e["filename"] == "a.txt"] == mine_before
    assert len(fake.fetches) == 1


@pytest.mark.parametrize(
    "names",
    [
        ["b.txt", "subfolder", "a-symlink", "a-fifo", "a.txt"],
        ["caf\N{REPLACEMENT CHARACTER}.txt", ".hidden", "with space.txt", "\N{CAT FACE}.txt"],
    ],
    ids=["subfolders-symlinks-fifos", "odd-names"],
)
async def test_whatever_the_go_list_holds_is_listed(
    agg: AggregatorProc, fake_go: FakeGoFactory, names: list[str]
) -> None:
    fake = await fake_go(agg.http_port, names)  # unsorted, as the Go watcher sends it
    assert (await fake.hello()).status == 200
    await wait_listed(fake, names)


async def test_a_null_file_list_is_an_empty_folder(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, None)  # Go encodes a nil slice as null
    assert (await fake.hello()).status == 200

    async def installed() -> list[dict[str, Any]]:
        return snapshot_installed(agg, fake.node)

    done = await wait_for_async(installed, SYNC_TIMEOUT, what="the empty snapshot")
    assert done[0]["files"] == 0
    assert await fake.listed() == []
    assert (await fake.patch(fake.change("add", "first.txt"))).status == 200
    await wait_listed(fake, ["first.txt"])


async def test_duplicate_and_reordered_patches_converge(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])  # snapshot at seqno 1
    fake.listing = (["a.txt"], 1)  # should it refetch, the list would not fix the order
    add_b = fake.op("add", "b.txt", 2)
    add_c = fake.op("add", "c.txt", 3)
    remove_b = fake.op("remove", "b.txt", 4)
    for op in (remove_b, add_c, add_c, add_b):  # applied in arrival order: b would stay
        assert (await fake.patch(op)).status == 200
    await wait_listed(fake, ["a.txt", "c.txt"])
    assert (await fake.patch(add_b)).status == 200  # a late duplicate: ignored
    assert (await fake.patch(fake.op("add", "d.txt", 5))).status == 200
    await wait_listed(fake, ["a.txt", "c.txt", "d.txt"])


async def test_several_operations_and_instances_in_one_patch(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    one = await fake_go(agg.http_port, ["a.txt"])
    two = await fake_go(agg.http_port, ["x.txt"])
    for fake in (one, two):
        assert (await fake.hello()).status == 200
    await wait_listed(one, ["a.txt"])
    await wait_listed(two, ["x.txt"])
    body = [one.change("add", "b.txt"), two.change("remove", "x.txt"), one.change("add", "c.txt")]
    assert (await one.patch(*body)).status == 200
    await wait_listed(one, ["a.txt", "b.txt", "c.txt"])
    await wait_listed(two, [])


# ---------------------------------------------------------------- fetching


async def test_patches_during_the_snapshot_fetch_are_applied_after_it(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    fake.listing = (["a.txt"], 1)
    # A slow GET /files, made deterministic: it waits until the test opens the gate.
    fake.gate = asyncio.Event()
    assert (await fake.hello()).status == 200
    await asyncio.wait_for(fake.fetch_started.wait(), SYNC_TIMEOUT)
    assert (await fake.patch(fake.op("add", "b.txt", 2))).status == 200
    assert (await fake.patch(fake.op("remove", "a.txt", 3))).status == 200
    assert await fake.listed() == []  # nothing before the snapshot
    fake.gate.set()  # the list (at seqno 1) is answered only now, well within the timeout
    await wait_listed(fake, ["b.txt"])
    assert len(fake.fetches) == 1


async def test_a_lower_bound_snapshot_converges(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    # Buffered before the list is read: add b (2), add c (3), remove a (4) ...
    ops = [fake.op("add", "b.txt", 2), fake.op("add", "c.txt", 3), fake.op("remove", "a.txt", 4)]
    for op in ops:
        assert (await fake.patch(op)).status == 200
    # ... and the list says seqno 2 but already holds c.txt (read after the lock).
    fake.listing = (["c.txt", "a.txt", "b.txt"], 2)
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["b.txt", "c.txt"])


async def test_a_lost_patch_triggers_a_refetch(agg: AggregatorProc, fake_go: FakeGoFactory) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (await fake.hello()).status == 200
    await wait_listed(fake, ["a.txt"])
    fake.change("add", "lost.txt")  # seqno 2: its PATCH never arrives
    assert (await fake.patch(fake.change("add", "b.txt"))).status == 200  # seqno 3: a gap
    await wait_listed(fake, ["a.txt", "b.txt", "lost.txt"], timeout=GAP_WAIT + SYNC_TIMEOUT)
    assert len(fake.fetches) == 2


@pytest.mark.parametrize(
    "mode",
    [FetchMode.HANG, FetchMode.FAIL, FetchMode.GARBAGE, FetchMode.WRONG_INSTANCE],
    ids=lambda m: m.value,
)
async def test_a_failed_list_fetch_is_retried_at_the_next_hello(
    agg: AggregatorProc,
    fake_go: FakeGoFactory,
    session: aiohttp.ClientSession,
    mode: FetchMode,
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt", "b.txt"])
    fake.set_mode(mode)
    assert (await fake.hello()).status == 200
    await asyncio.wait_for(fake.fetch_started.wait(), SYNC_TIMEOUT)
    # The aggregator stays healthy meanwhile (the fetch is off the request path).
    base = f"http://{HOST}:{agg.http_port}"
    started = time.monotonic()
    health = await async_request(session, "GET", f"{base}/healthz")
    assert health.status == 200
    assert (await async_request(session, "GET", f"{base}/files/")).status == 200
    assert time.monotonic() - started < FETCH_TIMEOUT
    assert await fake.listed() == []

    async def failed() -> bool:
        return any(
            e.get("node") == fake.node
            for e in agg.proc.events()
            if e.get("event") in ("legacy_fetch_failed", "legacy_instance_mismatch")
        )

    await wait_for_async(failed, FETCH_TIMEOUT + SYNC_TIMEOUT, what="the fetch to fail")
    assert await fake.listed() == []
    fake.set_mode(FetchMode.OK)  # fixed: the next hello gets the list
    await hello_until_listed(fake, ["a.txt", "b.txt"])


async def test_the_list_is_fetched_only_from_the_hello_sender(
    agg: AggregatorProc, fake_go: FakeGoFactory
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    assert (
        await fake.hello(host="10.1.2.3", addr="10.1.2.3", url="http://10.1.2.3:1/")
    ).status == 200
    await wait_listed(fake, ["a.txt"])
    assert [(f.remote, f.host_header, f.path) for f in fake.fetches] == [
        (HOST, f"{HOST}:{fake.port}", "/files")
    ]
    assert "10.1.2.3" not in agg.proc.log_text()


async def test_a_large_list_is_fetched_whole(agg: AggregatorProc, fake_go: FakeGoFactory) -> None:
    names = [f"file-{i:06d}-{uuid.uuid4().hex}.txt" for i in range(20_000)]  # ~1.3 MB of JSON
    fake = await fake_go(agg.http_port, names)
    assert (await fake.hello()).status == 200

    async def outcome() -> list[dict[str, Any]]:
        return [
            e
            for e in agg.proc.events()
            if e.get("node") == fake.node
            and e.get("event") in ("legacy_snapshot_installed", "legacy_fetch_failed")
        ]

    first = (await wait_for_async(outcome, SYNC_TIMEOUT, what="the list fetch"))[0]
    assert first["event"] == "legacy_snapshot_installed", first
    assert first["files"] == len(names)
    listed = await fake.listed()
    assert len(listed) == len(names)
    assert listed == sorted(names)


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/hello"), ("PATCH", "/files"), ("POST", "/bye")],
)
async def test_answers_are_exactly_200_with_json_and_never_redirect(
    agg: AggregatorProc, fake_go: FakeGoFactory, method: str, path: str
) -> None:
    fake = await fake_go(agg.http_port, ["a.txt"])
    bodies = {
        "/hello": {"instance": fake.instance, "port": fake.port},
        "/files": [fake.op("add", "b.txt", 2)],
        "/bye": {"instance": fake.instance},
    }
    reply = await fake.send(method, path, go_json(bodies[path]))
    assert reply.status == 200, reply  # not 201, not 204, not 301/302
    assert "location" not in reply.headers
    assert reply.content_type == "application/json"
    assert isinstance(reply.json(), dict)


@pytest.mark.parametrize("path", ["/files", "/files/"])
async def test_the_read_api_answers_directly(
    agg: AggregatorProc, session: aiohttp.ClientSession, path: str
) -> None:
    reply = await async_request(session, "GET", f"http://{HOST}:{agg.http_port}{path}")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert "files" in reply.json()
