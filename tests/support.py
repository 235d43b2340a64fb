"""The process harness shared by the e2e, legacy, faults and observability tests.

- `ProcessTracker` starts children (`python -m aggregator`, `python -m watcher`, or
  any argv) with their output in a log file, and stops exactly what it started, by
  PID, last started first: SIGTERM, a bounded wait, SIGKILL.
- `Proc` is one child: its JSON log events, `wait_event`, signals, stop and kill.
- `aggregator_ports` / `port_of` read the bound ports from the JSON "started" lines.
- `wait_for` / `wait_for_async` poll until a condition holds and fail with the
  last observed value; nothing here sleeps for correctness.
- `http_request` / `http_get` make one blocking request and return a `Reply`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
POLL_INTERVAL = 0.02
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")
TrackerT = TypeVar("TrackerT", bound="ProcessTracker")


# ---------------------------------------------------------------- polling


def _short(value: object, limit: int = 2000) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _fail_if_past(deadline: float, timeout: float, what: str, value: object) -> None:
    """Fail the test once `deadline` (monotonic) has passed, with the last value observed."""
    if time.monotonic() >= deadline:
        pytest.fail(
            f"timed out after {timeout} s waiting for {what}; last observed: {_short(value)}",
            pytrace=False,
        )


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
        _fail_if_past(deadline, timeout, what, value)
        time.sleep(interval)


async def wait_for_async(
    probe: Callable[[], Awaitable[T]],
    timeout: float,
    *,
    until: Callable[[T], bool] = bool,
    what: str = "the condition",
    interval: float = POLL_INTERVAL,
) -> T:
    """`wait_for` for coroutines: the event loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if until(value):
            return value
        _fail_if_past(deadline, timeout, what, value)
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Reply:
    """One HTTP response, read whole; header names lower-cased."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type, without parameters."""
        return self.headers.get("content-type", "").split(";")[0].strip()

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
    """One request to http://host:port, from the local address `source` if given.

    Redirects are never followed.
    """
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


def http_get(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> Reply:
    """GET http://127.0.0.1:port/path; redirects are not followed."""
    return http_request(port, "GET", path, headers=headers, timeout=timeout)


# ---------------------------------------------------------------- processes


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without flag twins or telemetry settings, plus `extra`: hermetic."""
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
        """Its JSON log lines, optionally only event `name` with matching fields.

        Other lines (e.g. from C libraries) are skipped.
        """
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

    def find_event(self, name: str, **fields: Any) -> dict[str, Any] | None:
        """The first log line of event `name` whose fields match, if any."""
        found = self.events(name, **fields)
        return found[0] if found else None

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

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait (bounded) for it to exit; returns its exit code."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.role} (pid {self.pid}) still runs after {timeout} s")

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.send(signal.SIGKILL)
        self.popen.wait(STOP_TIMEOUT)

    def term_then_kill(self) -> bool:
        """SIGTERM, a bounded wait, then SIGKILL; always reaps it; whether it had to be killed."""
        if self.popen.poll() is not None:
            return False
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(STOP_TIMEOUT)
            return True
        return False

    def stop(self) -> int:
        """SIGTERM, a bounded wait, then SIGKILL; returns the exit code."""
        self.term_then_kill()
        return self.popen.returncode

    def terminate(self) -> int:
        """Like `stop`, but fails the test if it ignored SIGTERM; returns its exit code."""
        if self.term_then_kill():
            pytest.fail(f"{self.role} (pid {self.pid}) ignored SIGTERM for {STOP_TIMEOUT} s")
        return self.popen.returncode

    def rss_kib(self) -> int:
        """Its resident set size (VmRSS, KiB) from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")


class ProcessTracker:
    """Starts children and stops exactly those, by PID, last started first.

    Children run in `cwd` (the log directory by default). With `strict_exit`, a
    non-zero exit on SIGTERM is a problem even for a child that never logged its
    start line (`Proc.ready`).
    """

    def __init__(
        self, log_dir: Path, *, cwd: Path | None = None, strict_exit: bool = False
    ) -> None:
        self.log_dir = log_dir
        self.cwd = cwd or log_dir
        self.strict_exit = strict_exit
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, role: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        """Start `argv` in its own session, stdout and stderr to a fresh log file."""
        log_path = self.log_dir / f"{len(self.procs):02d}-{role}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=_child_env(env),
                start_new_session=True,  # only our signals reach it
            )
        proc = Proc(role, list(argv), popen, log_path)
        self.procs.append(proc)
        return proc

    def spawn(
        self,
        role: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Proc:
        """Start `[prefix...] python args...` (sys.executable)."""
        return self.start(role, [*prefix, sys.executable, *args], env)

    def stop(self, proc: Proc) -> str | None:
        """SIGTERM one child, wait (bounded), SIGKILL if it hangs; what went wrong, if anything."""
        if not proc.alive:
            return None
        # A stopped (SIGSTOP) child must run again to hear SIGTERM.
        proc.send(signal.SIGCONT)
        if proc.term_then_kill():
            return f"{proc.role} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT} s; killed"
        code = proc.popen.returncode
        if code != 0 and (proc.ready or self.strict_exit):
            return f"{proc.role} (pid {proc.pid}) exited {code} on SIGTERM"
        return None

    def stop_all(self) -> list[str]:
        """Stop every child still running, LIFO; returns what went wrong."""
        problems = [self.stop(proc) for proc in reversed(self.procs)]
        return [p for p in problems if p]

    def log_tails(self, lines: int = 60) -> str:
        """The end of every child's log, for a failure report."""
        parts = []
        for proc in self.procs:
            tail = "\n".join(proc.log_text().splitlines()[-lines:])
            parts.append(f"===== {proc.log_path.name} (pid {proc.pid}) =====\n{tail}")
        return "\n".join(parts)


@dataclass
class AggregatorPorts:
    """A running `python -m aggregator` and the ports it bound (each area extends it)."""

    proc: Proc
    http_port: int
    grpc_port: int

    @property
    def grpc_target(self) -> str:
        """HOST:PORT of its gRPC server."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def grpc_url(self) -> str:
        """Its gRPC address as a (streaming) watcher's -aggregator flag wants it."""
        return f"grpc://{self.grpc_target}"

    @property
    def http_url(self) -> str:
        """Its HTTP base URL (also what a legacy watcher's -aggregator flag takes)."""
        return f"http://{HOST}:{self.http_port}"

    def files(self) -> list[str]:
        """The filenames of GET /files/, in the order served."""
        reply = http_get(self.http_port, "/files/")
        assert reply.status == 200, reply
        return [item["filename"] for item in reply.json()["files"]]

    def try_files(self) -> list[str] | None:
        """`files()`, or None while it cannot be reached (e.g. restarting)."""
        try:
            return self.files()
        except OSError:
            return None


def port_of(address: object, *, host: str | None = None) -> int:
    """The port of a "host:port" address of a started line (asserting the host if given)."""
    addr_host, _, port = str(address).rpartition(":")
    if host is not None:
        assert addr_host == host, address
    return int(port)


def aggregator_ports(started: Mapping[str, Any], *, host: str | None = None) -> tuple[int, int]:
    """(HTTP port, gRPC port) of an "aggregator_started" log line."""
    http_addr = started["http"]
    assert isinstance(http_addr, list) and len(http_addr) == 1, started
    return port_of(http_addr[0], host=host), port_of(started["grpc"], host=host)


# ---------------------------------------------------------------- fixtures and reporting


TRACKER = pytest.StashKey[ProcessTracker]()


def attach_tracker(node: pytest.Item | pytest.Collector, tracker: ProcessTracker) -> None:
    """Have failures of the tests under `node` show the end of `tracker`'s logs."""
    node.stash[TRACKER] = tracker


def tracked(node: pytest.Item | pytest.Collector, tracker: TrackerT) -> Iterator[TrackerT]:
    """Body of a `processes` fixture: yields `tracker`, then stops all, failing if unclean."""
    attach_tracker(node, tracker)
    yield tracker
    problems = tracker.stop_all()
    if problems:
        pytest.fail(
            "unclean shutdown: " + "; ".join(problems) + "\n" + tracker.log_tails(),
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def attach_logs_on_failure(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A `pytest_runtest_makereport`: on a failure, attach the end of every child's log."""
    report = yield
    tracker = item.stash.get(TRACKER, None)
    module = item.getparent(pytest.Module)
    if tracker is None and module is not None:
        tracker = module.stash.get(TRACKER, None)  # a module-scoped harness
    if report.failed and tracker is not None and call.when == "call":
        report.sections.append(("filewatch process logs", tracker.log_tails()))
    return report
