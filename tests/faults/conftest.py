"""Harness of the fault tests: real processes, real sockets, a proxy the test controls.

- `Processes` (the shared `tests.support.ProcessTracker`, children in the repository
  root) starts `python -m aggregator` / `python -m watcher`; `start_aggregator_in` /
  `start_watcher_in` learn their ports from their JSON "started" log lines.
  Everything binds 127.0.0.1.
- `TcpProxy` is a loopback TCP proxy on its own asyncio loop in a thread, so
  that blocking tests can drive it: `forward()`, `cut()` (close every connection
  and refuse new ones), `stall()` (accept and keep connections open but forward
  no byte: a half-open link) and `delay(seconds)` (latency on every byte).
- `RawSync` is a hand-driven gRPC `Sync` stream (the raw proto stubs): a test
  sends exactly the messages it wants, malformed or out of order, and reads
  exactly what comes back.
- `wait_for` / `wait_for_async` (tests.support) poll until a condition holds and
  fail with the last observed value; nothing here sleeps for correctness.
- `measured(what, value, unit)` records a convergence time (or a size); the summary
  prints them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import queue
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gen import filewatch_pb2 as pb
from tests.support import (
    HOST,
    ROOT,
    AggregatorPorts,
    Proc,
    ProcessTracker,
    Reply,
    aggregator_ports,
    attach_logs_on_failure,
    http_request,
    port_of,
    tracked,
    wait_for,
)

SYNC_TIMEOUT = 10.0
"""Bound on "a change shows up in GET /files/" when nothing is broken."""


MEASURED: list[tuple[str, float, str]] = []
"""(what, value, unit) measured by the tests (convergence times, memory), printed at the end."""


# ---------------------------------------------------------------- measurements


async def settled_rss(proc: Proc) -> int:
    """A process's RSS (KiB) once it has not moved by 1 MiB for 2 s (polled, up to 20 s).

    Freed memory reaches the RSS figure a beat after the frees (the last
    connections close, the collector runs), not at the instant of the last one.
    """
    samples: list[int] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        samples.append(proc.rss_kib())
        recent = samples[-9:]
        if len(recent) == 9 and max(recent) - min(recent) <= 1024:
            break
        await asyncio.sleep(0.25)
    return samples[-1]


def measured(what: str, value: float, unit: str = "s") -> float:
    """Record a measured value, a convergence time by default (printed at the end of the run)."""
    MEASURED.append((what, value, unit))
    return value


# ---------------------------------------------------------------- metrics


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text body (0 if absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ---------------------------------------------------------------- processes


class Processes(ProcessTracker):
    """The shared `ProcessTracker`, its children running in the repository root."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir, cwd=ROOT)


@dataclass
class Aggregator(AggregatorPorts):
    """A running `python -m aggregator`, the ports it bound, its TTL and extra flags."""

    ttl: float
    extra: tuple[str, ...] = ()

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


LEGACY_HELLO_PERIOD = "0.5"
"""The legacy watchers' --hello-interval, and the aggregators' --legacy-hello-period."""


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
            "--legacy-hello-period", LEGACY_HELLO_PERIOD,
            "--log-format", "json",
            *extra,
        ],
        env=env,
    )  # fmt: skip
    started = proc.wait_event("aggregator_started")
    proc.ready = True
    return Aggregator(proc, *aggregator_ports(started), ttl, tuple(extra))


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
    "--hello-interval", LEGACY_HELLO_PERIOD,
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
    return Watcher(proc, folder, node, port_of(started["http"]), str(started["instance"]))


# ---------------------------------------------------------------- folders


def wait_listed(agg: Aggregator, node: str, folder: Path, *, what: str, timeout: float) -> float:
    """Wait until the aggregator lists exactly the folder's files for `node`; seconds it took."""
    start = time.monotonic()
    wait_for(
        lambda: agg.try_node_files(node),
        timeout,
        until=lambda files: files == folder_names(folder),
        what=what,
    )
    return time.monotonic() - start


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
    """A Heartbeat that asks for an Ack (a barrier)."""
    return pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=sequence, want_ack=True))


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


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    """The children of this test; all stopped at teardown (LIFO, by PID)."""
    yield from tracked(request.node, Processes(tmp_path / "logs"))


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


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder outside the (root-only) pytest tmp tree, readable by an unprivileged user."""
    path = Path(tempfile.mkdtemp(prefix="filewatch-faults-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in path.iterdir():
            sub.chmod(0o755)
        shutil.rmtree(path)


def without_root_bypass() -> tuple[str, ...]:
    """A command prefix under which file permissions hold, even for root.

    Root reads anything: run as root without the capabilities that bypass file
    permissions (it can still read the project, which root owns). Skips the test
    when running as root without setpriv; empty when not root.
    """
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot take a folder out of reach")
    return ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search")


# ---------------------------------------------------------------- reporting


pytest_runtest_makereport = attach_logs_on_failure


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the convergence times the fault tests measured."""
    if not MEASURED:
        return
    terminalreporter.write_sep("-", "filewatch faults: measured")
    for what, value, unit in MEASURED:
        terminalreporter.write_line(f"{value:10.3f} {unit:<7} {what}")
