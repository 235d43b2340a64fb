"""The end-to-end harness: real aggregator and watcher processes, polled, never slept on.

Every process is started with `sys.executable -m ...`, its stdout and stderr in
a log file under the test's tmp_path, and its bound ports read from its JSON
"started" log line (everything binds port 0 on 127.0.0.1). The harness stops
exactly the processes it started, by their PID, last started first: SIGTERM,
a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_FOLDERS = ROOT / "sample-folders"
SAMPLE_LAYOUT = {"folder1": ("cats.txt", "dogs.txt"), "folder2": ("lions.txt", "tigers.txt")}
SAMPLE_FILES = ["cats.txt", "dogs.txt", "lions.txt", "tigers.txt"]
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
SYNC_TIMEOUT = 10.0
"""Bound on "a change shows up in /files/" (the spec says milliseconds)."""

T = TypeVar("T")

LAGS: list[float] = []
"""End-to-end lags (file created -> listed by GET /files/) measured by the tests."""


def _short(value: object, limit: int = 1500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def wait_for(
    probe: Callable[[], T],
    timeout: float,
    *,
    until: Callable[[T], bool] = bool,
    what: str = "the condition",
    interval: float = POLL_INTERVAL,
) -> T:
    """Call `probe` every `interval` s until `until(value)` holds; return that value.

    Fails the test after `timeout` seconds, showing the last observed value.
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


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpResponse:
    """One HTTP response, read whole; header names are lower-cased."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def http_get(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> HttpResponse:
    """GET http://127.0.0.1:port/path; redirects are not followed."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        body = resp.read()
        return HttpResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


# ---------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    """Our environment without flag twins or telemetry endpoints, so runs are hermetic."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEWATCH_", "OTEL_EXPORTER"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    """One child process of the harness and its log file."""

    role: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: bool = False
    """Set once it logged its start line: from then on it must stop cleanly on SIGTERM."""

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        """Its JSON log lines (other lines, e.g. from C libraries, are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if isinstance(item, dict):
                out.append(item)
        return out

    def find_event(self, event: str, **fields: Any) -> dict[str, Any] | None:
        """The first log line of `event` whose fields match, if any."""
        for item in self.events():
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                return item
        return None

    def wait_event(
        self, event: str, timeout: float = START_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """Poll the log for `event`; fail early if the process exits without it."""

        def probe() -> dict[str, Any] | None:
            found = self.find_event(event, **fields)
            if found is None and not self.alive:
                pytest.fail(
                    f"{self.role} (pid {self.pid}) exited with {self.popen.returncode} "
                    f"before logging {event!r}; its log:\n{self.log_text()}",
                    pytrace=False,
                )
            return found

        found = wait_for(probe, timeout, what=f"{self.role} to log {event!r} {fields or ''}")
        assert found is not None
        return found

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(STOP_TIMEOUT)

    def terminate(self) -> int:
        """SIGTERM it, wait (bounded), SIGKILL if it hangs; returns its exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
                pytest.fail(f"{self.role} (pid {self.pid}) ignored SIGTERM for {STOP_TIMEOUT} s")
        return self.popen.returncode


class ProcessTracker:
    """Starts children and stops exactly those, by PID, last started first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(self, role: str, args: Sequence[str]) -> Proc:
        """Start `python args...` with its output in a fresh log file."""
        argv = [sys.executable, *args]
        log_path = self.log_dir / f"{len(self.procs):02d}-{role}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
                env=_child_env(),
                start_new_session=True,  # our signals only, never the terminal's
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


# ---------------------------------------------------------------- the two services


@dataclass
class Aggregator:
    """A running `python -m aggregator` and the ports it bound."""

    proc: Proc
    http_port: int
    grpc_port: int
    ttl: float

    @property
    def grpc_target(self) -> str:
        """HOST:PORT of its gRPC server."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def grpc_url(self) -> str:
        """What a watcher's -aggregator flag takes."""
        return f"grpc://{self.grpc_target}"

    def get(self, path: str = "/files/", headers: Mapping[str, str] | None = None) -> HttpResponse:
        """GET a path of its HTTP API."""
        return http_get(self.http_port, path, headers)

    def files(self) -> list[str]:
        """The filenames of GET /files/, in the order served."""
        resp = self.get("/files/")
        assert resp.status == 200, resp
        return [item["filename"] for item in resp.json()["files"]]

    def try_files(self) -> list[str] | None:
        """Like `files`, but None while it cannot be reached (e.g. restarting)."""
        try:
            return self.files()
        except OSError:
            return None

    def detail(self) -> dict[str, Any]:
        """GET /files/?detail=1, parsed."""
        resp = self.get("/files/?detail=1")
        assert resp.status == 200, resp
        body: dict[str, Any] = resp.json()
        return body

    def entries(self) -> list[tuple[str, str]]:
        """(filename, node) of every entry, in the order served."""
        return [(e["filename"], e["node"]) for e in self.detail()["files"]]


@dataclass
class Watcher:
    """A running `python -m watcher` on one folder."""

    proc: Proc
    folder: Path
    node: str
    http_port: int


@dataclass
class AggregatorFactory:
    """Starts aggregators: `start_aggregator(ttl=2)`; explicit ports for a restart."""

    tracker: ProcessTracker

    def __call__(self, *, ttl: float = 2.0, http_port: int = 0, grpc_port: int = 0) -> Aggregator:
        args = [
            "-m",
            "aggregator",
            "--http",
            f"{HOST}:{http_port}",
            "--grpc",
            f"{HOST}:{grpc_port}",
            "--ttl",
            str(ttl),
            "--log-format",
            "json",
        ]
        proc = self.tracker.spawn("aggregator", args)
        started = proc.wait_event("aggregator_started")
        proc.ready = True
        http_addr = started["http"]
        assert isinstance(http_addr, list) and len(http_addr) == 1, started
        host, _, http = http_addr[0].rpartition(":")
        grpc_host, _, grpc = str(started["grpc"]).rpartition(":")
        assert host == grpc_host == HOST, started
        if http_port:
            assert int(http) == http_port, started
        if grpc_port:
            assert int(grpc) == grpc_port, started
        return Aggregator(proc, int(http), int(grpc), ttl)


@dataclass
class WatcherFactory:
    """Starts watchers: `start_watcher(folder, aggregator)`, or `spawn` then `ready`."""

    tracker: ProcessTracker

    def spawn(self, folder: Path, aggregator: Aggregator, *, name: str = "", port: int = 0) -> Proc:
        """Start a watcher without waiting for it."""
        args = [
            "-m",
            "watcher",
            f"-dir={folder}",
            f"-p={port}",
            f"-aggregator={aggregator.grpc_url}",
            "--http-host",
            HOST,
            "--log-format",
            "json",
            "--heartbeat-interval",
            "0.5",
            "--reconnect-max",
            "0.5",
        ]
        if name:
            args.append(f"--name={name}")
        return self.tracker.spawn(f"watcher-{folder.name}", args)

    def ready(self, proc: Proc, folder: Path) -> Watcher:
        """Wait for a spawned watcher's start line."""
        started = proc.wait_event("watcher_started")
        proc.ready = True
        host, _, port = str(started["http"]).rpartition(":")
        assert host == HOST, started
        return Watcher(proc, folder, str(started["node"]), int(port))

    def __call__(
        self, folder: Path, aggregator: Aggregator, *, name: str = "", port: int = 0
    ) -> Watcher:
        return self.ready(self.spawn(folder, aggregator, name=name, port=port), folder)


@dataclass(frozen=True)
class SampleFolders:
    """This test's copy of sample-folders/."""

    folder1: Path
    folder2: Path


@dataclass
class Cluster:
    """An aggregator with one watcher on each sample folder, listing all four files."""

    aggregator: Aggregator
    watcher1: Watcher
    watcher2: Watcher
    folders: SampleFolders


@dataclass
class ClusterFactory:
    """Starts a `Cluster` and waits until the aggregator lists the sample files."""

    start_aggregator: AggregatorFactory
    start_watcher: WatcherFactory
    folders: SampleFolders

    def __call__(self, *, ttl: float = 2.0, names: tuple[str, str] = ("", "")) -> Cluster:
        aggregator = self.start_aggregator(ttl=ttl)
        f1, f2 = self.folders.folder1, self.folders.folder2
        # Both start at once; then each is waited for.
        p1 = self.start_watcher.spawn(f1, aggregator, name=names[0])
        p2 = self.start_watcher.spawn(f2, aggregator, name=names[1])
        w1 = self.start_watcher.ready(p1, f1)
        w2 = self.start_watcher.ready(p2, f2)
        wait_for(
            aggregator.try_files,
            START_TIMEOUT,
            until=lambda files: files == SAMPLE_FILES,
            what="the sample files to be listed",
        )
        return Cluster(aggregator, w1, w2, self.folders)


# ---------------------------------------------------------------- fixtures

_TRACKER = pytest.StashKey[ProcessTracker]()


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """The children of this test; all stopped at teardown (LIFO, by PID)."""
    tracker = ProcessTracker(tmp_path / "logs")
    request.node.stash[_TRACKER] = tracker
    yield tracker
    problems = tracker.stop_all()
    if problems:
        pytest.fail(
            "unclean shutdown: " + "; ".join(problems) + "\n" + tracker.log_tails(),
            pytrace=False,
        )


@pytest.fixture
def sample_folders(tmp_path: Path) -> SampleFolders:
    """A fresh copy of sample-folders/ (folder1: cats, dogs; folder2: lions, tigers).

    Only the documented files are copied, so that a stray file left in the
    repository's copy (by a person or a concurrent run) cannot skew a test.
    """
    dest = tmp_path / "sample-folders"
    for folder, names in SAMPLE_LAYOUT.items():
        (dest / folder).mkdir(parents=True)
        for name in names:
            shutil.copy2(SAMPLE_FOLDERS / folder / name, dest / folder / name)
    return SampleFolders(dest / "folder1", dest / "folder2")


@pytest.fixture
def start_aggregator(processes: ProcessTracker) -> AggregatorFactory:
    """Factory of aggregator processes."""
    return AggregatorFactory(processes)


@pytest.fixture
def start_watcher(processes: ProcessTracker) -> WatcherFactory:
    """Factory of watcher processes."""
    return WatcherFactory(processes)


@pytest.fixture
def start_cluster(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    sample_folders: SampleFolders,
) -> ClusterFactory:
    """Factory of a whole cluster over the sample folders."""
    return ClusterFactory(start_aggregator, start_watcher, sample_folders)


@pytest.fixture
def cluster(start_cluster: ClusterFactory) -> Cluster:
    """A cluster with the default test TTL (2 s)."""
    return start_cluster()


@pytest.fixture
def lags() -> list[float]:
    """Where tests record measured end-to-end lags (printed in the summary)."""
    return LAGS


# ---------------------------------------------------------------- reporting


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the end of every child's log to the report."""
    report = yield
    tracker = item.stash.get(_TRACKER, None)
    if report.failed and tracker is not None and call.when == "call":
        report.sections.append(("filewatch process logs", tracker.log_tails()))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the measured end-to-end lag, if any test measured it."""
    if LAGS:
        ms = sorted(lag * 1000 for lag in LAGS)
        terminalreporter.write_line(
            f"filewatch e2e lag (file created -> in GET /files/, {len(ms)} samples, "
            f"polled every 5 ms): median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"
        )
