"""Harness of the legacy-protocol tests: real processes, a fake Go watcher, bounded polls.

- `Processes` starts `python -m aggregator` and `python -m watcher` (sys.executable,
  output to a log file), learns their ports from their JSON "started" log lines and
  stops exactly what it started, by PID, last started first (SIGTERM, a bounded
  wait, SIGKILL). Everything binds 127.0.0.1, port 0 unless a test asks otherwise.
- `FakeGoWatcher` plays the original Go watcher over the wire, inside the test's
  event loop: an aiohttp server answering `GET /files` as the Go program does
  (unsorted, seqno as a lower bound; or hanging, failing, lying as told), and a raw
  client sending exactly its `POST /hello`, `POST /bye` and `PATCH /files`.
- `wait_for` / `wait_for_async` (tests.support) poll every 20 ms until a condition
  holds and fail with the last observed value; nothing here sleeps for correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.support import (
    HOST,
    ROOT,
    AggregatorPorts,
    Proc,
    ProcessTracker,
    Reply,
    aggregator_ports,
    http_request,
    port_of,
)

SAMPLE_FOLDERS = ROOT / "sample-folders"
SYNC_TIMEOUT = 10.0
"""Bound on "a change shows up in GET /files/" (the spec says milliseconds)."""
TTL = 3.0
"""The --ttl every aggregator of these tests runs with."""
GAP_WAIT = 0.3
"""The --gap-wait every aggregator of these tests runs with."""
HELLO_PERIOD = 1.0
"""The --hello-interval of these tests' watchers, and the aggregators' --legacy-hello-period."""


# ---------------------------------------------------------------- HTTP (blocking)


def files_body(port: int, detail: bool = False) -> bytes:
    """The raw body of the aggregator's GET /files/ (asserting 200)."""
    reply = http_request(port, "GET", "/files/?detail=1" if detail else "/files/")
    assert reply.status == 200, reply
    return reply.body


def entries(port: int) -> list[dict[str, Any]]:
    """The entries of GET /files/?detail=1 (filename, node, size, modified)."""
    files: list[dict[str, Any]] = json.loads(files_body(port, detail=True))["files"]
    return files


def node_files(port: int, node: str) -> list[str]:
    """The filenames the aggregator lists for one watcher, in its order."""
    return [e["filename"] for e in entries(port) if e["node"] == node]


# ---------------------------------------------------------------- HTTP (async)


async def async_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One request with aiohttp; redirects are never followed."""
    async with session.request(
        method, url, data=body, headers=dict(headers or {}), allow_redirects=False
    ) as resp:
        data = await resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)


async def async_entries(session: aiohttp.ClientSession, port: int) -> list[dict[str, Any]]:
    """The entries of GET /files/?detail=1, read without blocking the loop."""
    reply = await async_request(session, "GET", f"http://{HOST}:{port}/files/?detail=1")
    assert reply.status == 200, reply
    files: list[dict[str, Any]] = reply.json()["files"]
    return files


async def async_node_files(session: aiohttp.ClientSession, port: int, node: str) -> list[str]:
    """The filenames the aggregator lists for one watcher."""
    return [e["filename"] for e in await async_entries(session, port) if e["node"] == node]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session for the test's own requests."""
    async with aiohttp.ClientSession() as s:
        yield s


# ---------------------------------------------------------------- processes


@dataclass
class AggregatorProc(AggregatorPorts):
    """A running `python -m aggregator` and the ports it bound."""

    @property
    def url(self) -> str:
        """Its legacy/HTTP base URL (`http_url`)."""
        return self.http_url


@dataclass
class WatcherProc:
    """A running `python -m watcher` and what it announced."""

    proc: Proc
    port: int
    folder: Path
    instance: str

    @property
    def node(self) -> str:
        """Its node name at the aggregator when it speaks the legacy protocol."""
        return f"{HOST}:{self.port}"


class Processes(ProcessTracker):
    """The shared `ProcessTracker`, plus starting the two services as these tests want them."""

    def start_aggregator(
        self, *extra: str, http_port: int = 0, grpc_port: int = 0
    ) -> AggregatorProc:
        """Start an aggregator (--ttl 3 --gap-wait 0.3) and wait for its started line."""
        proc = self.spawn(
            "aggregator",
            [
                "-m", "aggregator",
                "--http", f"{HOST}:{http_port}",
                "--grpc", f"{HOST}:{grpc_port}",
                "--ttl", str(TTL),
                "--gap-wait", str(GAP_WAIT),
                "--legacy-hello-period", str(HELLO_PERIOD),
                "--log-format", "json",
                *extra,
            ],
        )  # fmt: skip
        started = proc.wait_event("aggregator_started")
        return AggregatorProc(proc, *aggregator_ports(started))

    def start_watcher(
        self,
        folder: Path,
        aggregator: str,
        *extra: str,
        port: int = 0,
        hello_interval: float = HELLO_PERIOD,
    ) -> WatcherProc:
        """Start a watcher on `folder` reporting to `aggregator` (http:// or grpc://)."""
        proc = self.spawn(
            "watcher",
            [
                "-m", "watcher",
                f"-dir={folder}",
                f"-p={port}",
                f"-aggregator={aggregator}",
                "--http-host", HOST,
                "--log-format", "json",
                "--hello-interval", str(hello_interval),
                *extra,
            ],
        )  # fmt: skip
        started = proc.wait_event("watcher_started")
        return WatcherProc(proc, port_of(started["http"]), folder, started["instance"])


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes of one test, stopped at its end."""
    p = Processes(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop_all()


class AggregatorFactory(Protocol):
    """Starts an aggregator for one test."""

    def __call__(self, *extra: str, http_port: int = 0, grpc_port: int = 0) -> AggregatorProc:
        """Extra flags are appended to the command line."""
        ...


class WatcherFactory(Protocol):
    """Starts a watcher for one test."""

    def __call__(
        self,
        folder: Path,
        aggregator: str,
        *extra: str,
        port: int = 0,
        hello_interval: float = HELLO_PERIOD,
    ) -> WatcherProc:
        """`aggregator` is its -aggregator URL (http:// for the legacy protocol)."""
        ...


@pytest.fixture
def start_aggregator(procs: Processes) -> AggregatorFactory:
    """A typed factory of aggregators stopped at the end of the test."""
    return procs.start_aggregator


@pytest.fixture
def start_watcher(procs: Processes) -> WatcherFactory:
    """A typed factory of watchers stopped at the end of the test."""
    return procs.start_watcher


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class Folders:
    """Fresh copies of sample-folders/folder1 and folder2."""

    folder1: Path
    folder2: Path


def copy_samples(dest: Path) -> Folders:
    """Copy the sample folders under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    f1 = Path(shutil.copytree(SAMPLE_FOLDERS / "folder1", dest / "folder1"))
    f2 = Path(shutil.copytree(SAMPLE_FOLDERS / "folder2", dest / "folder2"))
    return Folders(f1, f2)


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    """folder1 (cats.txt, dogs.txt) and folder2 (lions.txt, tigers.txt), copied."""
    return copy_samples(tmp_path / "data")


# ---------------------------------------------------------------- fake Go watcher


class FetchMode(enum.Enum):
    """How the fake Go watcher answers `GET /files`."""

    OK = "ok"
    HANG = "hang"  # never answers (until the test changes the mode)
    FAIL = "fail"  # 500
    GARBAGE = "garbage"  # 200 with a body that is not JSON
    WRONG_INSTANCE = "wrong_instance"  # 200, but the list of another instance


@dataclass
class Fetch:
    """One `GET /files` the fake received."""

    remote: str | None
    host_header: str | None
    path: str


def go_json(value: object) -> bytes:
    """JSON as Go's encoding/json writes it (compact).

    Lone surrogates (our watcher's escapes of undecodable bytes, which Go never
    writes) go through the standard library: orjson refuses them.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


class FakeGoWatcher:
    """The original Go watcher over the wire: its GET /files server and its requests.

    `files`/`seqno` are its state; `change()` moves them like a real change would and
    returns the PATCH operation. `listing`, if set, is what GET /files answers instead
    (a list the test controls, e.g. stale or a lower bound).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        aggregator_port: int,
        files: Sequence[str] | None,
        seqno: int,
        token: str | None,
    ) -> None:
        self._session = session
        self.aggregator_port = aggregator_port
        self.instance = str(uuid.uuid4())
        self.files: list[str] | None = list(files) if files is not None else None
        self.seqno = seqno
        self.listing: tuple[list[str] | None, int] | None = None
        self.mode = FetchMode.OK
        self.gate: asyncio.Event | None = None
        self.fetches: list[Fetch] = []
        self.fetch_started = asyncio.Event()
        self._release = asyncio.Event()
        self.headers = {"Content-Type": "application/json"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------ its server

    async def start(self) -> None:
        """Serve GET /files on 127.0.0.1, a free port."""
        app = web.Application()
        app.router.add_get("/files", self._get_files)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Release hung handlers and stop serving."""
        self._release.set()
        if self.gate is not None:
            self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def set_mode(self, mode: FetchMode) -> None:
        """Change how GET /files answers from now on (releases hung requests)."""
        self.mode = mode
        if mode is not FetchMode.HANG:
            self._release.set()
        else:
            self._release = asyncio.Event()

    async def _get_files(self, request: web.Request) -> web.Response:
        self.fetches.append(Fetch(request.remote, request.headers.get("Host"), request.path_qs))
        self.fetch_started.set()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 30)
        if self.mode is FetchMode.HANG:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), 30)
        if self.mode is FetchMode.FAIL:
            return web.Response(status=500, text="internal error")
        if self.mode is FetchMode.GARBAGE:
            return web.Response(body=b"<html>not json</html>", content_type="application/json")
        files, seqno = self.listing if self.listing is not None else (self.files, self.seqno)
        instance = str(uuid.uuid4()) if self.mode is FetchMode.WRONG_INSTANCE else self.instance
        payload = {
            "instance": instance,
            "files": None if files is None else [{"filename": n} for n in files],
            "seqno": seqno,
        }
        return web.Response(body=go_json(payload), content_type="application/json")

    # ------------------------------------------------------------ its state

    @property
    def node(self) -> str:
        """Its node name at the aggregator: the hello's source address and port."""
        return f"{HOST}:{self.port}"

    def restart(self, files: Sequence[str]) -> None:
        """A new process on the same port: a new instance, seqno 1 after its scan."""
        self.instance = str(uuid.uuid4())
        self.files = list(files)
        self.seqno = 1
        self.listing = None

    def op(self, op: str, filename: str, seqno: int, instance: str | None = None) -> dict[str, Any]:
        """One PATCH operation exactly as the Go watcher encodes it."""
        return {
            "instance": instance or self.instance,
            "op": op,
            "value": {"filename": filename},
            "seqno": seqno,
        }

    def change(self, op: str, filename: str) -> dict[str, Any]:
        """Apply one change to its state (seqno + 1) and return its PATCH operation."""
        self.seqno += 1
        files = self.files if self.files is not None else []
        if op == "add" and filename not in files:
            files.append(filename)
        elif op == "remove" and filename in files:
            files.remove(filename)
        self.files = files
        return self.op(op, filename, self.seqno)

    # ------------------------------------------------------------ its requests

    async def send(self, method: str, path: str, body: bytes) -> Reply:
        """A raw request to the aggregator with the Go watcher's headers."""
        url = f"http://{HOST}:{self.aggregator_port}{path}"
        return await async_request(self._session, method, url, body, self.headers)

    async def hello(self, **extra: object) -> Reply:
        """POST /hello {"instance":..,"port":..} (plus `extra` fields)."""
        return await self.send(
            "POST", "/hello", go_json({"instance": self.instance, "port": self.port, **extra})
        )

    async def bye(self) -> Reply:
        """POST /bye {"instance":..}."""
        return await self.send("POST", "/bye", go_json({"instance": self.instance}))

    async def patch(self, *ops: Mapping[str, Any]) -> Reply:
        """PATCH /files [op, ...]."""
        return await self.send("PATCH", "/files", go_json(list(ops)))

    async def listed(self) -> list[str]:
        """What the aggregator lists for this fake's node."""
        return await async_node_files(self._session, self.aggregator_port, self.node)


class FakeGoFactory(Protocol):
    """Starts a fake Go watcher reporting to an aggregator."""

    async def __call__(
        self,
        aggregator_port: int,
        files: Sequence[str] | None = ("a.txt",),
        *,
        seqno: int = 1,
        token: str | None = None,
    ) -> FakeGoWatcher:
        """`files` None lists `"files":null` (Go's nil slice)."""
        ...


@pytest.fixture
async def fake_go(session: aiohttp.ClientSession) -> AsyncIterator[FakeGoFactory]:
    """Fake Go watchers of one test; each says bye and stops serving at the end."""
    fakes: list[FakeGoWatcher] = []

    async def make(
        aggregator_port: int,
        files: Sequence[str] | None = ("a.txt",),
        *,
        seqno: int = 1,
        token: str | None = None,
    ) -> FakeGoWatcher:
        fake = FakeGoWatcher(session, aggregator_port, files, seqno, token)
        await fake.start()
        fakes.append(fake)
        return fake

    try:
        yield make
    finally:
        for fake in reversed(fakes):
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await fake.bye()  # leave a shared aggregator clean
            await fake.close()


# ---------------------------------------------------------------- loopback proxy


@dataclass
class DroppingProxy:
    """A loopback HTTP proxy in front of the aggregator that can lose PATCHes.

    `drop_next_patch()` makes it answer the next PATCH with 200 without forwarding
    it: exactly a PATCH the Go watcher sent and the network lost.
    """

    target_port: int
    session: aiohttp.ClientSession
    port: int = 0
    to_drop: int = 0
    dropped: list[bytes] = field(default_factory=list)
    forwarded: list[tuple[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def drop_next_patch(self, count: int = 1) -> None:
        """Lose the next `count` PATCHes."""
        self.to_drop += count

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "PATCH" and self.to_drop > 0:
            self.to_drop -= 1
            self.dropped.append(body)
            return web.Response(body=b'{"status":"ok"}', content_type="application/json")
        self.forwarded.append((request.method, request.path))
        headers = {
            k: v for k, v in request.headers.items() if k in ("Content-Type", "Authorization")
        }
        url = f"http://{HOST}:{self.target_port}{request.path_qs}"
        reply = await async_request(self.session, request.method, url, body, headers)
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers={"Content-Type": reply.headers.get("content-type", "application/json")},
        )

    async def start(self) -> None:
        """Listen on 127.0.0.1, a free port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
