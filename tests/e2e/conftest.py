"""The end-to-end harness: real aggregator and watcher processes, polled, never slept on.

Every process is started with `sys.executable -m ...`, its stdout and stderr in
a log file under the test's tmp_path, and its bound ports read from its JSON
"started" log line (everything binds port 0 on 127.0.0.1). The harness stops
exactly the processes it started, by their PID, last started first: SIGTERM,
a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    HOST,
    ROOT,
    AggregatorPorts,
    Proc,
    ProcessTracker,
    Reply,
    aggregator_ports,
    attach_logs_on_failure,
    http_get,
    port_of,
    tracked,
    wait_for,
)

SAMPLE_FOLDERS = ROOT / "sample-folders"
SAMPLE_LAYOUT = {"folder1": ("cats.txt", "dogs.txt"), "folder2": ("lions.txt", "tigers.txt")}
SAMPLE_FILES = ["cats.txt", "dogs.txt", "lions.txt", "tigers.txt"]
START_TIMEOUT = 15.0
SYNC_TIMEOUT = 10.0
"""Bound on "a change shows up in /files/" (the spec says milliseconds)."""

LAGS: list[float] = []
"""End-to-end lags (file created -> listed by GET /files/) measured by the tests."""


# ---------------------------------------------------------------- the two services


@dataclass
class Aggregator(AggregatorPorts):
    """A running `python -m aggregator`, the ports it bound and its TTL."""

    ttl: float

    def get(self, path: str = "/files/", headers: Mapping[str, str] | None = None) -> Reply:
        """GET a path of its HTTP API."""
        return http_get(self.http_port, path, headers)

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
        http, grpc = aggregator_ports(started, host=HOST)
        if http_port:
            assert http == http_port, started
        if grpc_port:
            assert grpc == grpc_port, started
        return Aggregator(proc, http, grpc, ttl)


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
        return Watcher(proc, folder, str(started["node"]), port_of(started["http"], host=HOST))

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


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """The children of this test; all stopped at teardown (LIFO, by PID)."""
    yield from tracked(request.node, ProcessTracker(tmp_path / "logs"))


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


pytest_runtest_makereport = attach_logs_on_failure


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the measured end-to-end lag, if any test measured it."""
    if LAGS:
        ms = sorted(lag * 1000 for lag in LAGS)
        terminalreporter.write_line(
            f"filewatch e2e lag (file created -> in GET /files/, {len(ms)} samples, "
            f"polled every 5 ms): median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"
        )
