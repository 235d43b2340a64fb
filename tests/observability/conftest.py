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
import subprocess
import sys
import urllib.error
import urllib.request
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
    aggregator_ports,
    attach_logs_on_failure,
    port_of,
    tracked,
)

OBSERVABILITY = ROOT / "observability"
AGGREGATOR_JOB = "filewatch-aggregator"
WATCHER_JOB = "filewatch-watcher"
"""The job names of observability/prometheus.yml, which the rules and dashboard select on."""


def in_ci() -> bool:
    """Whether we run in CI, where nothing may be skipped for a missing tool."""
    return bool(os.environ.get("CI"))


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


@dataclass
class Aggregator(AggregatorPorts):
    """A running `python -m aggregator` and its bound ports."""

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


def start_aggregator(
    tracker: ProcessTracker, *, env: Mapping[str, str] | None = None, ttl: float = 15.0
) -> Aggregator:
    """Start an aggregator on ephemeral loopback ports and wait for its start line."""
    argv = [sys.executable, "-m", "aggregator", "--http", f"{HOST}:0", "--grpc", f"{HOST}:0"]
    argv += ["--ttl", str(ttl), "--log-format", "json"]
    proc = tracker.start("aggregator", argv, env)
    started = proc.wait_event("aggregator_started")
    return Aggregator(proc, *aggregator_ports(started, host=HOST))


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
    proc = tracker.start(f"watcher-{folder.name}", argv, env)
    started = proc.wait_event("watcher_started")
    return Watcher(
        proc,
        folder,
        str(started["node"]),
        str(started.get("instance", "")),
        port_of(started["http"], host=HOST),
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


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """The children of this test, all stopped at teardown (LIFO, by PID)."""
    yield from tracked(request.node, ProcessTracker(tmp_path / "logs", strict_exit=True))


pytest_runtest_makereport = attach_logs_on_failure


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
