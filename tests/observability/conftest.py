"""Harness of the observability tests: real aggregator, watcher and Prometheus processes.

Every child binds 127.0.0.1 only, writes its output to a log file under the
test's tmp_path, and is stopped by its PID at teardown, last started first:
SIGTERM, a bounded wait, then SIGKILL. Ports are ephemeral and read from the
children's JSON "started" log lines. Waits are bounded polls, never sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "observability"
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
AGGREGATOR_JOB = "filewatch-aggregator"
WATCHER_JOB = "filewatch-watcher"
"""The job names of observability/prometheus.yml, which the rules and dashboard select on."""

T = TypeVar("T")


def in_ci() -> bool:
    """Whether we run in CI, where nothing may be skipped for a missing tool."""
    return bool(os.environ.get("CI"))


def wait_for(
    probe: Callable[[], T],
    timeout: float,
    *,
    until: Callable[[T], bool] = bool,
    what: str = "the condition",
    interval: float = POLL_INTERVAL,
) -> T:
    """Call `probe` every `interval` s until `until(value)`; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            text = repr(value)
            if len(text) > 2000:
                text = text[:2000] + "..."
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {text}")
        time.sleep(interval)


def http_get_text(url: str, timeout: float = 5.0) -> str:
    """GET a loopback URL; the body as text (raises on errors and non-2xx)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URLs)
        body: bytes = resp.read()
    return body.decode("utf-8")


def try_get_text(url: str, timeout: float = 2.0) -> str | None:
    """Like `http_get_text`, None while the server does not answer (yet)."""
    try:
        return http_get_text(url, timeout)
    except (OSError, urllib.error.URLError):
        return None


# ---------------------------------------------------------------- processes


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus flag twins and OTEL settings, plus `extra`: hermetic children."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEWATCH_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """A child process and its log file."""

    role: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """Its PID."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        """Its JSON log lines (other lines are skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue  # being written right now
            if isinstance(item, dict):
                out.append(item)
        return out

    def wait_event(self, event: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll the log for a JSON line of `event`; fail early if the process exits."""

        def probe() -> dict[str, Any] | None:
            found = next((e for e in self.events() if e.get("event") == event), None)
            if found is None and not self.alive:
                pytest.fail(
                    f"{self.role} (pid {self.pid}) exited {self.popen.returncode} before "
                    f"logging {event!r}:\n{self.log_text()[-4000:]}"
                )
            return found

        found = wait_for(probe, timeout, what=f"{self.role} to log {event!r}")
        assert found is not None
        return found


@dataclass
class ProcessTracker:
    """Starts children and stops exactly those, by PID, last started first."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, role: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        """Start `argv` in its own session, its output in a fresh log file."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{len(self.procs):02d}-{role}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
                env=child_env(env),
                start_new_session=True,  # our signals only, never the terminal's
            )
        proc = Proc(role, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> str | None:
        """SIGTERM one child, wait (bounded), SIGKILL if it hangs; what went wrong, if anything."""
        if proc.popen.poll() is not None:
            return None
        proc.popen.send_signal(signal.SIGTERM)
        try:
            code = proc.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(STOP_TIMEOUT)
            return f"{proc.role} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT} s; killed"
        if code != 0:
            return f"{proc.role} (pid {proc.pid}) exited {code} on SIGTERM"
        return None

    def stop_all(self) -> list[str]:
        """Stop every child still running, LIFO; returns the problems."""
        problems = [self.stop(proc) for proc in reversed(self.procs)]
        return [p for p in problems if p]

    def log_tails(self, lines: int = 40) -> str:
        """The end of every child's log, for a failure report."""
        parts = []
        for proc in self.procs:
            tail = "\n".join(proc.log_text().splitlines()[-lines:])
            parts.append(f"===== {proc.log_path.name} (pid {proc.pid}) =====\n{tail}")
        return "\n".join(parts)


@dataclass(frozen=True)
class Aggregator:
    """A running `python -m aggregator` and its bound ports."""

    proc: Proc
    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        """Its HTTP base URL (also what a legacy watcher's -aggregator flag takes)."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """What a streaming watcher's -aggregator flag takes."""
        return f"grpc://{HOST}:{self.grpc_port}"

    def metrics(self) -> str:
        """Its /metrics text."""
        return http_get_text(f"{self.http_url}/metrics")


@dataclass(frozen=True)
class Watcher:
    """A running `python -m watcher` on one folder."""

    proc: Proc
    folder: Path
    node: str
    instance: str
    http_port: int

    def metrics(self) -> str:
        """Its /metrics text."""
        return http_get_text(f"http://{HOST}:{self.http_port}/metrics")


def _port_of(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host == HOST, address
    return int(port)


def start_aggregator(
    tracker: ProcessTracker, *, env: Mapping[str, str] | None = None, ttl: float = 15.0
) -> Aggregator:
    """Start an aggregator on ephemeral loopback ports and wait for its start line."""
    argv = [sys.executable, "-m", "aggregator", "--http", f"{HOST}:0", "--grpc", f"{HOST}:0"]
    argv += ["--ttl", str(ttl), "--log-format", "json"]
    proc = tracker.spawn("aggregator", argv, env)
    started = proc.wait_event("aggregator_started")
    http = started["http"]
    assert isinstance(http, list) and len(http) == 1, started
    return Aggregator(proc, _port_of(str(http[0])), _port_of(str(started["grpc"])))


def start_watcher(
    tracker: ProcessTracker,
    folder: Path,
    aggregator_url: str,
    *,
    env: Mapping[str, str] | None = None,
) -> Watcher:
    """Start a watcher on `folder` reporting to `aggregator_url` (grpc:// or http://)."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "watcher",
        f"-dir={folder}",
        "-p=0",
        f"-aggregator={aggregator_url}",
        "--http-host",
        HOST,
        "--log-format",
        "json",
        "--heartbeat-interval",
        "0.5",
        "--hello-interval",
        "0.5",
        "--reconnect-max",
        "0.5",
    ]
    proc = tracker.spawn(f"watcher-{folder.name}", argv, env)
    started = proc.wait_event("watcher_started")
    return Watcher(
        proc,
        folder,
        str(started["node"]),
        str(started.get("instance", "")),
        _port_of(str(started["http"])),
    )


# ---------------------------------------------------------------- observability/ files


def dashboard() -> dict[str, Any]:
    """observability/grafana-dashboard.json, parsed."""
    data: dict[str, Any] = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return data


def dashboard_exprs() -> list[str]:
    """The PromQL of every target of every panel (rows' nested panels included)."""
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(str(t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard().get("panels", []))
    return exprs


_EXPR_LINE = re.compile(r"^(?P<indent>\s*)(?:-\s+)?expr:\s*(?P<value>.*?)\s*$")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        return inner.replace("''", "'") if value[0] == "'" else json.loads(value)
    return value


def rule_exprs(path: Path | None = None) -> list[str]:
    """The `expr` of every rule in a Prometheus rules file (plain, quoted or block scalars).

    A small reader for the shapes a rules file uses, so that these tests need
    no YAML library; the real Prometheus loading the same file (test_prometheus)
    checks that nothing was missed.
    """
    lines = (path or OBSERVABILITY / "alerts.yml").read_text().splitlines()
    exprs: list[str] = []
    i = 0
    while i < len(lines):
        match = _EXPR_LINE.match(lines[i])
        i += 1
        if match is None:
            continue
        value = match["value"]
        if value and value[0] in "|>":
            indent = len(match["indent"])
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            exprs.append(" ".join(part for part in block if part))
        else:
            exprs.append(_unquote(value))
    return exprs


# ---------------------------------------------------------------- fixtures


_TRACKER = pytest.StashKey[ProcessTracker]()


def attach_tracker(node: pytest.Item | pytest.Collector, tracker: ProcessTracker) -> None:
    """Have failures of the tests under `node` show the end of `tracker`'s logs."""
    node.stash[_TRACKER] = tracker


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """The children of this test, all stopped at teardown (LIFO, by PID)."""
    tracker = ProcessTracker(tmp_path / "logs")
    attach_tracker(request.node, tracker)
    yield tracker
    problems = tracker.stop_all()
    if problems:
        pytest.fail("unclean shutdown: " + "; ".join(problems) + "\n" + tracker.log_tails())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the end of every child's log to the report."""
    report = yield
    tracker = item.stash.get(_TRACKER, None)
    module = item.getparent(pytest.Module)
    if tracker is None and module is not None:
        tracker = module.stash.get(_TRACKER, None)  # a module-scoped harness
    if report.failed and tracker is not None and call.when == "call":
        report.sections.append(("filewatch process logs", tracker.log_tails()))
    return report


def _install_tools() -> None:
    script = OBSERVABILITY / "install-tools.sh"
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """Debian's `prometheus` binary; in CI installed when missing, elsewhere skipped."""
    found = shutil.which("prometheus")
    if found is None and in_ci():
        _install_tools()
        found = shutil.which("prometheus")
        if found is None:
            pytest.fail("observability/install-tools.sh ran but there is still no prometheus")
    if found is None:
        pytest.skip("no prometheus binary: run observability/install-tools.sh")
    return found


@pytest.fixture(scope="session")
def promtool_bin(prometheus_bin: str) -> str:
    """Debian's `promtool` (same package as prometheus)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"prometheus is at {prometheus_bin} but promtool is missing")
    return found
