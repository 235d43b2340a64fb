"""Harness of the fault tests: real processes, real sockets, a proxy the test controls.

- `Processes` starts `python -m aggregator` / `python -m watcher` (sys.executable,
  output to a log file under the test's tmp_path), learns their ports from their
  JSON "started" log lines, and stops exactly what it started, by PID, last
  started first: SIGTERM, a bounded wait, SIGKILL. Everything binds 127.0.0.1.
- `TcpProxy` is a loopback TCP proxy on its own asyncio loop in a thread, so
  that blocking tests can drive it: `forward()`, `cut()` (close every connection
  and refuse new ones), `stall()` (accept and keep connections open but forward
  no byte: a half-open link) and `delay(seconds)` (latency on every byte).
- `RawSync` is a hand-driven gRPC `Sync` stream (the raw proto stubs): a test
  sends exactly the messages it wants, malformed or out of order, and reads
  exactly what comes back.
- `wait_for` / `wait_for_async` poll until a condition holds and fail with the
  last observed value; nothing here sleeps for correctness.
- `measured(what, value, unit)` records a convergence time (or a size); the summary
  prints them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import http.client
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gen import filewatch_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
POLL_INTERVAL = 0.02
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
SYNC_TIMEOUT = 10.0
"""Bound on "a change shows up in GET /files/" when nothing is broken."""

T = TypeVar("T")

MEASURED: list[tuple[str, float, str]] = []
"""(what, value, unit) measured by the tests (convergence times, memory), printed at the end."""


# ---------------------------------------------------------------- polling


def _short(value: object, limit: int = 2000) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def wait_for(
    probe: Callable[[], T],
    timeout: float,
    *,
    until: Callable[[T], bool] = bool,
    what: str = "the condition",
    interval: float = POLL_INTERVAL,
) -> T:
    """Call `probe` every `interval` s until `until(value)` holds, and return that value.

    Fails the test after `timeout` seconds with the last value observed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            pytest.fail(
                f"timed out after {timeout} s waiting for {what}; last observed: {_short(value)}",
                pytrace=False,
            )
        time.sleep(interval)


async def wait_for_async(
    probe: Callable[[], Any],
    timeout: float,
    *,
    until: Callable[[Any], bool] = bool,
    what: str = "the condition",
    interval: float = POLL_INTERVAL,
) -> Any:
    """`wait_for` for coroutines (`probe` returns an awaitable); the loop runs between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            pytest.fail(
                f"timed out after {timeout} s waiting for {what}; last observed: {_short(value)}",
                pytrace=False,
            )
        await asyncio.sleep(interval)


def measured(what: str, value: float, unit: str = "s") -> float:
    """Record a measured value, a convergence time by default (printed at the end of the run)."""
    MEASURED.append((what, value, unit))
    return value


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Reply:
    """One HTTP response, read whole; header names lower-cased."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 5.0,
    source: str | None = None,
    host: str = HOST,
) -> Reply:
    """One request to http://host:port; from the local address `source` if given."""
    conn = http.client.HTTPConnection(
        host, port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text body (0 if absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ---------------------------------------------------------------- processes


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """Our environment without flag twins or telemetry endpoints, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEWATCH_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """One child process and its log file."""

    role: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: bool = False
    """Set once it logged its start line: from then on it must stop cleanly on SIGTERM."""

    @property
    def pid(self) -> int:
        """Its PID."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether it still runs."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Its JSON log lines, optionally only event `name` with matching fields."""
        out: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if not isinstance(item, dict):
                continue
            if name is not None and item.get("event") != name:
                continue
            if all(item.get(k) == v for k, v in fields.items()):
                out.append(item)
        return out

    def count(self, name: str, **fields: Any) -> int:
        """How many times it logged event `name` (with matching fields)."""
        return len(self.events(name, **fields))

    def wait_event(
        self, name: str, timeout: float = START_TIMEOUT, *, after: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """Poll the log for occurrence number `after + 1` of event `name`.

        Fails at once if the process exits first.
        """

        def probe() -> dict[str, Any] | None:
            found = self.events(name, **fields)
            if len(found) > after:
                return found[after]
            if not self.alive:
                pytest.fail(
                    f"{self.role} (pid {self.pid}) exited with {self.popen.returncode} before "
                    f"logging {name!r} {fields or ''}; its log:\n{self.log_text()[-5000:]}",
                    pytrace=False,
                )
            return None

        found = wait_for(probe, timeout, what=f"{self.role} to log {name!r} {fields or ''}")
        assert found is not None
        return found

    def send(self, sig: signal.Signals) -> None:
        """Send one signal to it (by PID), if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.send(signal.SIGKILL)
        self.popen.wait(STOP_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM, a bounded wait, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
        return self.popen.returncode

    def rss_kib(self) -> int:
        """Its resident set size (VmRSS, KiB) from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")


class Processes:
    """Starts children and stops exactly those, by PID, last started first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(
        self,
        role: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Proc:
        """Start `[prefix...] python args...`, stdout and stderr to a fresh log file."""
        argv = [*prefix, sys.executable, *args]
        log_path = self.log_dir / f"{len(self.procs):02d}-{role}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=_child_env(env),
                start_new_session=True,  # only our signals reach it
            )
        proc = Proc(role, argv, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> list[str]:
        """Stop every child still running, LIFO; returns what went wrong."""
        problems = []
        for proc in reversed(self.procs):
            if proc.popen.poll() is not None:
                continue
            # A stopped (SIGSTOP) child must run again to hear SIGTERM.
            proc.send(signal.SIGCONT)
            proc.popen.send_signal(signal.SIGTERM)
            try:
                code = proc.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.popen.send_signal(signal.SIGKILL)
                proc.popen.wait(STOP_TIMEOUT)
                problems.append(f"{proc.role} (pid {proc.pid}) ignored SIGTERM; killed")
                continue
            if code != 0 and proc.ready:
                problems.append(f"{proc.role} (pid {proc.pid}) exited {code} on SIGTERM")
        return problems

    def log_tails(self, lines: int = 60) -> str:
        """The end of every child's log, for a failure report."""
        parts = []
        for proc in self.procs:
            tail = proc.log_text().splitlines()[-lines:]
            parts.append(f"===== {proc.log_path.name} (pid {proc.pid}) =====\n" + "\n".join(tail))
        return "\n".join(parts)


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@dataclass
class Aggregator:
    """A running `python -m aggregator` and the ports it bound."""

    proc: Proc
    http_port: int
    grpc_port: int
    ttl: float
    extra: tuple[str, ...] = ()

    @property
    def grpc_target(self) -> str:
        """HOST:PORT of its gRPC server."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def grpc_url(self) -> str:
        """Its gRPC address as a watcher's -aggregator flag wants it."""
        return f"grpc://{self.grpc_target}"

    @property
    def http_url(self) -> str:
        """Its legacy/HTTP base URL."""
        return f"http://{HOST}:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        source: str | None = None,
    ) -> Reply:
        """One request to its HTTP port."""
        return http_request(self.http_port, method, path, body, headers, source=source)

    def entries(self) -> list[dict[str, Any]]:
        """GET /files/?detail=1 entries (filename, node, size, modified), in order."""
        reply = self.request("GET", "/files/?detail=1")
        assert reply.status == 200, reply
        files: list[dict[str, Any]] = reply.json()["files"]
        return files

    def files(self) -> list[str]:
        """The filenames of GET /files/, in the order served."""
        reply = self.request("GET", "/files/")
        assert reply.status == 200, reply
        return [item["filename"] for item in reply.json()["files"]]

    def try_files(self) -> list[str] | None:
        """`files()`, or None while it cannot be reached."""
        try:
            return self.files()
        except OSError:
            return None

    def node_files(self, node: str) -> list[str]:
        """The filenames it lists for one watcher, in its order."""
        return [e["filename"] for e in self.entries() if e["node"] == node]

    def try_node_files(self, node: str) -> list[str] | None:
        """`node_files()`, or None while it cannot be reached."""
        try:
            return self.node_files(node)
        except OSError:
            return None

    def healthz(self) -> dict[str, Any]:
        """GET /healthz, parsed."""
        body: dict[str, Any] = self.request("GET", "/healthz").json()
        return body

    def metrics(self) -> str:
        """GET /metrics."""
        return self.request("GET", "/metrics").body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of its /metrics."""
        return metric_value(self.metrics(), name, **labels)


@dataclass
class Watcher:
    """A running `python -m watcher`: its folder, node name and HTTP port."""

    proc: Proc
    folder: Path
    node: str
    http_port: int
    instance: str

    def healthz(self) -> dict[str, Any]:
        """Its GET /healthz, parsed."""
        body: dict[str, Any] = http_request(self.http_port, "GET", "/healthz").json()
        return body

    def own_files(self) -> list[str]:
        """Its own GET /files list, sorted."""
        body = http_request(self.http_port, "GET", "/files").json()
        return sorted(item["filename"] for item in body["files"])

    def metric(self, name: str, **labels: str) -> float:
        """One sample of its /metrics."""
        text = http_request(self.http_port, "GET", "/metrics").body.decode()
        return metric_value(text, name, **labels)


class AggregatorFactory(Protocol):
    """Starts an aggregator for one test."""

    def __call__(
        self,
        *extra: str,
        ttl: float = 2.0,
        http_port: int = 0,
        grpc_port: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> Aggregator:
        """Extra flags are appended to the command line."""
        ...


class WatcherFactory(Protocol):
    """Starts a watcher for one test."""

    def __call__(
        self,
        folder: Path,
        aggregator: str,
        *extra: str,
        name: str = "",
        port: int = 0,
        wait: bool = True,
        code: str | None = None,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Watcher:
        """`aggregator` is its -aggregator URL; `code` runs it under a `python -c` shim."""
        ...


def start_aggregator_in(
    procs: Processes,
    *extra: str,
    ttl: float = 2.0,
    http_port: int = 0,
    grpc_port: int = 0,
    env: Mapping[str, str] | None = None,
) -> Aggregator:
    """Start an aggregator (JSON logs) and wait for its started line."""
    proc = procs.spawn(
        "aggregator",
        [
            "-m", "aggregator",
            "--http", f"{HOST}:{http_port}",
            "--grpc", f"{HOST}:{grpc_port}",
            "--ttl", str(ttl),
            "--log-format", "json",
            *extra,
        ],
        env=env,
    )  # fmt: skip
    started = proc.wait_event("aggregator_started")
    proc.ready = True
    return Aggregator(
        proc, _port_of(started["http"][0]), _port_of(started["grpc"]), ttl, tuple(extra)
    )


def restart_aggregator_in(procs: Processes, old: Aggregator) -> Aggregator:
    """A new aggregator on the ports (and flags) of `old`, which must have exited."""
    assert not old.proc.alive
    return start_aggregator_in(
        procs, *old.extra, ttl=old.ttl, http_port=old.http_port, grpc_port=old.grpc_port
    )


WATCHER_DEFAULTS: tuple[str, ...] = (
    "--heartbeat-interval", "0.3",
    "--reconnect-min", "0.05",
    "--reconnect-max", "0.5",
    "--keepalive", "1",
    "--hello-interval", "0.5",
)  # fmt: skip
"""Fast fault detection; a test's own flags come later and win."""


def start_watcher_in(
    procs: Processes,
    folder: Path,
    aggregator: str,
    *extra: str,
    name: str = "",
    port: int = 0,
    wait: bool = True,
    code: str | None = None,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Watcher:
    """Start a watcher on `folder` and (unless `wait` is False) wait for its started line."""
    args = [
        f"-dir={folder}",
        f"-p={port}",
        f"-aggregator={aggregator}",
        "--http-host", HOST,
        "--log-format", "json",
        *WATCHER_DEFAULTS,
        *extra,
    ]  # fmt: skip
    if name:
        args.append(f"--name={name}")
    head = ["-c", code] if code is not None else ["-m", "watcher"]
    proc = procs.spawn(f"watcher-{name or folder.name}", [*head, *args], env=env, prefix=prefix)
    if not wait:
        return Watcher(proc, folder, name, 0, "")
    started = proc.wait_event("watcher_started")
    proc.ready = True
    node = name or str(started.get("node", ""))
    return Watcher(proc, folder, node, _port_of(started["http"]), str(started["instance"]))


# ---------------------------------------------------------------- folders


def folder_names(*folders: Path) -> list[str]:
    """The regular files directly in `folders`, as the aggregator lists them, sorted."""
    names: list[str] = []
    for folder in folders:
        with os.scandir(os.fsencode(folder)) as it:
            names.extend(os.fsdecode(e.name) for e in it if e.is_file())
    return sorted(names)


def fill(folder: Path, count: int, prefix: str = "f") -> list[str]:
    """Create `count` small files in `folder`; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}{i:05d}.txt" for i in range(count)]
    for name in names:
        (folder / name).write_bytes(name.encode())
    return names


class Churn:
    """Random creates, renames, modifications and deletes in folders, from a thread.

    `run_for(seconds)` churns in the foreground; `start()` / `stop()` in the
    background. Every operation is a real file-system call; the truth is the
    folders themselves (read with `folder_names`).
    """

    def __init__(self, *folders: Path, seed: int = 0, pause: float = 0.005) -> None:
        self.folders = folders
        self.rng = random.Random(seed)
        self.pause = pause
        self.ops = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.error: BaseException | None = None

    def step(self) -> None:
        """One random operation in one of the folders."""
        folder = self.rng.choice(self.folders)
        names = [n for n in os.listdir(folder) if (folder / n).is_file()]
        roll = self.rng.random()
        self._counter += 1
        try:
            if not names or roll < 0.4:
                (folder / f"churn-{self._counter:06d}.txt").write_text("x")
            elif roll < 0.6:
                os.rename(folder / self.rng.choice(names), folder / f"moved-{self._counter:06d}")
            elif roll < 0.8:
                (folder / self.rng.choice(names)).write_text("y" * self.rng.randrange(1, 100))
            else:
                os.unlink(folder / self.rng.choice(names))
        except FileNotFoundError:
            pass  # raced with itself: harmless
        self.ops += 1

    def run_for(self, seconds: float) -> None:
        """Churn in the foreground for `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step()
            time.sleep(self.pause)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
                self._stop.wait(self.pause)
        except BaseException as err:  # reported by stop()
            self.error = err

    def start(self) -> Churn:
        """Churn in a background thread until `stop()`."""
        self._thread = threading.Thread(target=self._loop, name="churn", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop churning; returns how many operations ran."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise self.error
        return self.ops


# ---------------------------------------------------------------- the proxy


class ProxyMode(enum.Enum):
    """What the proxy does with bytes."""

    FORWARD = "forward"
    CUT = "cut"  # every connection closed; new ones reset at once
    STALL = "stall"  # connections accepted and kept, no byte forwarded (half-open)
    DELAY = "delay"  # every byte forwarded `delay` seconds late


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """A loopback TCP proxy on its own event loop (a thread), controlled by the test.

    Listens on 127.0.0.1 (a free port) and forwards to `upstream_port`. The mode
    applies to existing connections at once: `cut()` resets them all and stops
    listening, so that new ones are refused by the kernel (ECONNREFUSED, as from a
    host whose service is down); `stall()` keeps them open but holds every byte
    (and accepts new ones that go nowhere); `forward()` listens again on the same
    port and releases held bytes in order; `delay(s)` adds `s` seconds of latency
    to every byte.
    """

    def __init__(self, upstream_port: int, upstream_host: str = HOST) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.mode = ProxyMode.FORWARD
        self.accepted = 0
        self._latency = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._flowing: asyncio.Event | None = None

    # ------------------------------------------------------------ control (test thread)

    def start(self) -> TcpProxy:
        """Listen; returns self."""
        self._thread.start()
        self._call(self._start())
        return self

    def forward(self) -> None:
        """Forward every byte (releases stalled connections)."""
        self._call(self._set(ProxyMode.FORWARD, 0.0))

    def cut(self) -> None:
        """Reset every connection; reset new ones at once."""
        self._call(self._set(ProxyMode.CUT, 0.0))

    def stall(self) -> None:
        """Keep connections open but forward nothing (a half-open link)."""
        self._call(self._set(ProxyMode.STALL, 0.0))

    def delay(self, seconds: float) -> None:
        """Forward every byte `seconds` late."""
        self._call(self._set(ProxyMode.DELAY, seconds))

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._links)

    def close(self) -> None:
        """Stop listening, reset every connection, stop the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ------------------------------------------------------------ the loop's side

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set(self, mode: ProxyMode, latency: float) -> None:
        assert self._flowing is not None
        self.mode, self._latency = mode, latency
        if mode is ProxyMode.CUT:
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.abort()
            self._links.clear()
        elif self._server is None:
            await self._listen()
        if mode is ProxyMode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is ProxyMode.CUT:  # accepted just before the listener closed
            writer.transport.abort()
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._links.discard(link)
            writer.transport.abort()
            return
        link.upstream = up_writer
        if link not in self._links:  # cut while we connected
            link.abort()
            return
        link.tasks = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        self._links.discard(link)
        for task in link.tasks:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy src to dst; bytes wait while stalled and keep their order when delayed."""
        assert self._flowing is not None
        # Bounded: a stalled link stops reading, so the sender's buffers fill up.
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(4)
        writer = asyncio.ensure_future(self._deliver(pending, dst))
        try:
            while True:
                try:
                    data = await src.read(65536)
                except OSError:
                    return
                if not data:
                    await pending.join()  # what was read still goes out
                    return
                await pending.put((time.monotonic() + self._latency, data))
                if writer.done():
                    return
        finally:
            writer.cancel()

    async def _deliver(
        self, pending: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter
    ) -> None:
        assert self._flowing is not None
        while True:
            due, data = await pending.get()
            await self._flowing.wait()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            try:
                dst.write(data)
                await dst.drain()
            except (OSError, RuntimeError):
                return
            finally:
                pending.task_done()


# ---------------------------------------------------------------- raw gRPC Sync peer


def hello_msg(node: str, epoch: str, last_sequence: int = 0, **fields: Any) -> pb.WatcherMessage:
    """A Hello message."""
    return pb.WatcherMessage(
        hello=pb.Hello(node=node, epoch=epoch, last_sequence=last_sequence, **fields)
    )


def file_info(name: bytes, size: int = 1, mtime_ns: int = 1_700_000_000_000_000_000) -> pb.FileInfo:
    """A FileInfo."""
    return pb.FileInfo(name=name, size=size, mtime_ns=mtime_ns)


def chunk_msg(names: Sequence[bytes]) -> pb.WatcherMessage:
    """A SnapshotChunk of these names."""
    return pb.WatcherMessage(snapshot_chunk=pb.SnapshotChunk(files=[file_info(n) for n in names]))


def end_msg(sequence: int, count: int) -> pb.WatcherMessage:
    """A SnapshotEnd."""
    return pb.WatcherMessage(snapshot_end=pb.SnapshotEnd(sequence=sequence, count=count))


def batch_msg(sequence: int, *changes: tuple[int, bytes]) -> pb.WatcherMessage:
    """A Batch of (op, name) changes."""
    return pb.WatcherMessage(
        batch=pb.Batch(
            sequence=sequence,
            changes=[pb.Change(op=op, file=file_info(name)) for op, name in changes],  # type: ignore[arg-type]
            observed_unix_ns=time.time_ns(),
        )
    )


def heartbeat_msg(sequence: int) -> pb.WatcherMessage:
    """A Heartbeat."""
    return pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=sequence))


def _identity(data: bytes) -> bytes:
    return data


class RawSync:
    """One `Sync` stream driven by hand: `send()` messages (or raw bytes), `recv()` answers.

    A thread reads the answers; `status()` waits for the end of the call and
    returns its code and details.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: Sequence[tuple[str, str]] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._in: queue.Queue[pb.AggregatorMessage | None] = queue.Queue()
        method = channel.stream_stream(
            "/filewatch.v1.WatcherSync/Sync",
            request_serializer=_identity,
            response_deserializer=pb.AggregatorMessage.FromString,
        )
        self._call = method(self._requests(), metadata=metadata, timeout=timeout)
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._reader = threading.Thread(target=self._read, name="raw-sync", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for msg in self._call:
                self._in.put(msg)
            self.code, self.details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            self.code, self.details = err.code(), err.details() or ""
        finally:
            self._in.put(None)

    def send(self, *messages: pb.WatcherMessage | bytes) -> RawSync:
        """Queue messages (or raw wire bytes) for sending, in order."""
        for msg in messages:
            self._out.put(msg if isinstance(msg, bytes) else msg.SerializeToString())
        return self

    def recv(self, timeout: float = 5.0) -> pb.AggregatorMessage | None:
        """The next answer, or None once the stream has ended."""
        try:
            return self._in.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no answer on the Sync stream within {timeout} s", pytrace=False)

    def recv_kind(self, kind: str, timeout: float = 5.0) -> pb.AggregatorMessage:
        """The next answer, which must be of `kind` (welcome, ack, resync)."""
        msg = self.recv(timeout)
        assert msg is not None, f"stream ended ({self.code}: {self.details}) instead of a {kind}"
        assert msg.WhichOneof("kind") == kind, f"expected a {kind}, got {msg}"
        return msg

    def close(self) -> None:
        """Half-close: no more messages from us."""
        self._out.put(None)

    def cancel(self) -> None:
        """Cancel the call."""
        self._out.put(None)
        self._call.cancel()

    def status(self, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
        """Wait for the end of the call; its code and details."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            self.cancel()
            pytest.fail(f"the Sync stream did not end within {timeout} s", pytrace=False)
        assert self.code is not None
        return self.code, self.details

    def answers(self) -> list[pb.AggregatorMessage]:
        """Every answer still queued (call after `status()`)."""
        out: list[pb.AggregatorMessage] = []
        while True:
            try:
                msg = self._in.get_nowait()
            except queue.Empty:
                return out
            if msg is not None:
                out.append(msg)


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- fixtures

_PROCS = pytest.StashKey[Processes]()


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    """The children of this test; all stopped at teardown (LIFO, by PID)."""
    tracker = Processes(tmp_path / "logs")
    request.node.stash[_PROCS] = tracker
    yield tracker
    problems = tracker.stop_all()
    if problems:
        pytest.fail(
            "unclean shutdown: " + "; ".join(problems) + "\n" + tracker.log_tails(),
            pytrace=False,
        )


@pytest.fixture
def start_aggregator(procs: Processes) -> AggregatorFactory:
    """Factory of aggregators stopped at the end of the test."""

    def start(
        *extra: str,
        ttl: float = 2.0,
        http_port: int = 0,
        grpc_port: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> Aggregator:
        return start_aggregator_in(
            procs, *extra, ttl=ttl, http_port=http_port, grpc_port=grpc_port, env=env
        )

    return start


@pytest.fixture
def start_watcher(procs: Processes) -> WatcherFactory:
    """Factory of watchers stopped at the end of the test."""

    def start(
        folder: Path,
        aggregator: str,
        *extra: str,
        name: str = "",
        port: int = 0,
        wait: bool = True,
        code: str | None = None,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Watcher:
        return start_watcher_in(
            procs,
            folder,
            aggregator,
            *extra,
            name=name,
            port=port,
            wait=wait,
            code=code,
            prefix=prefix,
            env=env,
        )

    return start


@pytest.fixture
def proxies() -> Iterator[Callable[[int], TcpProxy]]:
    """Factory of loopback proxies to an upstream port; all closed at teardown."""
    made: list[TcpProxy] = []

    def make(upstream_port: int) -> TcpProxy:
        proxy = TcpProxy(upstream_port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def channels() -> Iterator[Callable[[str], grpc.Channel]]:
    """Factory of blocking gRPC channels; all closed at teardown."""
    made: list[grpc.Channel] = []

    def make(target: str) -> grpc.Channel:
        channel = grpc.insecure_channel(target)
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


# ---------------------------------------------------------------- reporting


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the end of every child's log to the report."""
    report = yield
    tracker = item.stash.get(_PROCS, None)
    if report.failed and tracker is not None and call.when == "call":
        report.sections.append(("filewatch process logs", tracker.log_tails()))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the convergence times the fault tests measured."""
    if not MEASURED:
        return
    terminalreporter.write_sep("-", "filewatch faults: measured")
    for what, value, unit in MEASURED:
        terminalreporter.write_line(f"{value:10.3f} {unit:<7} {what}")
