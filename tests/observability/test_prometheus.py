"""The real Prometheus server scraping a real aggregator and two watchers with our config.

Prometheus runs observability/prometheus.yml with only the targets (the
children's ephemeral ports) and the intervals (1 s) changed, and loads
observability/alerts.yml. The test makes file changes and asks Prometheus' HTTP
API for the sync lag; it also runs every dashboard query and checks the rules
load. Skipped outside CI when Debian's prometheus is not installed; in CI it is
installed when missing (observability/install-tools.sh).
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import subprocess
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.observability.conftest import (
    AGGREGATOR_JOB,
    OBSERVABILITY,
    WATCHER_JOB,
    Aggregator,
    Watcher,
    dashboard_exprs,
    http_get_text,
    rule_exprs,
    start_aggregator,
    start_watcher,
    try_get_text,
)
from tests.support import HOST, ROOT, START_TIMEOUT, Proc, ProcessTracker, attach_tracker, wait_for

SCRAPE_TIMEOUT = 30.0
"""Bound on "Prometheus has scraped a non-zero lag histogram and can take its p99"."""

COUNT_QUERY = "sum(filewatch_sync_lag_seconds_count)"
P99_QUERY = "histogram_quantile(0.99, sum by (le) (rate(filewatch_sync_lag_seconds_bucket[1m])))"

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1s",
    "$__range": "1m",
}
"""What Grafana substitutes in dashboard queries, for running them on Prometheus directly."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus server and its HTTP API."""

    proc: Proc
    port: int

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://{HOST}:{self.port}/api/v1/{path}{query}"
        try:
            body = json.loads(http_get_text(url))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            pytest.fail(f"Prometheus refused {path} {params}: {err.code} {detail}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector result."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element instant query, None when it has no result."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


def prometheus_config(
    aggregator: Aggregator, watchers: list[Watcher], rules: Path = OBSERVABILITY / "alerts.yml"
) -> str:
    """observability/prometheus.yml with our ports, 1 s intervals and an absolute rules path."""
    text = (OBSERVABILITY / "prometheus.yml").read_text()
    watcher_targets = ", ".join(f'"{HOST}:{w.http_port}"' for w in watchers)
    replacements = {
        "scrape_interval: 5s": "scrape_interval: 1s",
        "scrape_timeout: 4s": "scrape_timeout: 1s",
        "evaluation_interval: 5s": "evaluation_interval: 1s",
        "- alerts.yml": f"- {json.dumps(str(rules))}",
        '["127.0.0.1:8000"]': f'["{HOST}:{aggregator.http_port}"]',
        '["127.0.0.1:4000", "127.0.0.1:4001"]': f"[{watcher_targets}]",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"observability/prometheus.yml should have {old!r} once"
        text = text.replace(old, new)
    return text


def _ready_probe(proc: Proc, url: str) -> Callable[[], str | None]:
    """A probe: "exited" once the process is gone, else the body of its /-/ready, if any."""
    return lambda: "exited" if not proc.alive else try_get_text(url)


def start_prometheus(tracker: ProcessTracker, binary: str, config: Path, data: Path) -> Prometheus:
    """Start Prometheus on a free loopback port and wait until it is ready."""
    for _attempt in range(3):
        port = _free_port()
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=warn",
        ]
        proc = tracker.start("prometheus", argv)
        state = wait_for(
            _ready_probe(proc, f"http://{HOST}:{port}/-/ready"),
            START_TIMEOUT,
            what="Prometheus to be ready",
        )
        if state != "exited":
            return Prometheus(proc, port)
        if "address already in use" not in proc.log_text():
            pytest.fail(f"prometheus exited {proc.popen.returncode}:\n{proc.log_text()[-4000:]}")
        # Another process took the port between our probe and Prometheus' bind: again.
    pytest.fail("prometheus found no free port in 3 tries")


@dataclass(frozen=True)
class Observed:
    """An aggregator and two watchers, scraped by a Prometheus loading our rules."""

    aggregator: Aggregator
    watchers: list[Watcher]
    prometheus: Prometheus

    changes: Iterator[int] = field(default_factory=itertools.count)

    def touch(self) -> None:
        """Make one more change: a new file, in each watcher's folder by turns."""
        n = next(self.changes)
        folder = self.watchers[n % len(self.watchers)].folder
        (folder / f"change-{n:04d}.txt").write_text(f"change {n}\n")


@pytest.fixture(scope="module")
def observed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prometheus_bin: str,
) -> Iterator[Observed]:
    """The whole set, shared by this module's tests; every process stopped at the end."""
    tmp = tmp_path_factory.mktemp("observed")
    tracker = ProcessTracker(tmp / "logs", strict_exit=True)
    attach_tracker(request.node, tracker)
    try:
        aggregator = start_aggregator(tracker)
        watchers = []
        for name in ("folder1", "folder2"):
            folder = tmp / name
            folder.mkdir()
            (folder / f"{name}-seed.txt").write_text("seed\n")
            watchers.append(start_watcher(tracker, folder, aggregator.grpc_url))
        config = tmp / "prometheus.yml"
        config.write_text(prometheus_config(aggregator, watchers))
        prometheus = start_prometheus(tracker, prometheus_bin, config, tmp / "data")
        yield Observed(aggregator, watchers, prometheus)
    finally:
        problems = tracker.stop_all()
    if problems:
        pytest.fail("unclean shutdown: " + "; ".join(problems) + "\n" + tracker.log_tails())


def wait_for_lag(observed: Observed) -> tuple[float, float]:
    """Make changes until Prometheus has a non-zero lag count and a finite p99; returns both."""
    prom = observed.prometheus

    def probe() -> tuple[float | None, float | None]:
        # Keep changing files: rate() needs the buckets to grow between two scrapes.
        observed.touch()
        return prom.scalar(COUNT_QUERY), prom.scalar(P99_QUERY)

    count, p99 = wait_for(
        probe,
        SCRAPE_TIMEOUT,
        until=lambda v: (v[0] or 0) > 0 and v[1] is not None and math.isfinite(v[1]),
        what="a non-zero filewatch_sync_lag_seconds_count and a finite p99",
        interval=0.25,
    )
    assert count is not None and p99 is not None
    return count, p99


def test_prometheus_scrapes_the_sync_lag(observed: Observed) -> None:
    """Changes made -> Prometheus has a non-zero lag count and a sane p99 from the histogram."""
    count, p99 = wait_for_lag(observed)
    assert count > 0
    assert 0 < p99 <= 10, f"p99 sync lag {p99} s is not sane"


def test_every_process_is_scraped(observed: Observed) -> None:
    """The aggregator and both watchers are up under the config's job names."""
    prom = observed.prometheus
    expected = {
        (AGGREGATOR_JOB, f"{HOST}:{observed.aggregator.http_port}"),
        *((WATCHER_JOB, f"{HOST}:{w.http_port}") for w in observed.watchers),
    }

    def up() -> dict[tuple[str, str], str]:
        return {
            (r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
            for r in prom.query('up{job=~"filewatch-.*"}')
        }

    wait_for(
        up,
        SCRAPE_TIMEOUT,
        until=lambda seen: seen == dict.fromkeys(expected, "1"),
        what="every target up",
    )
    # The aggregator's view, through Prometheus: both watchers connected.
    watchers = wait_for(
        lambda: prom.scalar(f'sum(filewatch_watchers{{job="{AGGREGATOR_JOB}"}})'),
        SCRAPE_TIMEOUT,
        until=lambda v: v == len(observed.watchers),
        what="filewatch_watchers to count both watchers",
    )
    assert watchers == 2


def test_alert_rules_load_and_evaluate(observed: Observed) -> None:
    """Prometheus loaded every rule of alerts.yml, each evaluates cleanly, none fires."""
    prom = observed.prometheus
    expected = len(rule_exprs())
    assert expected >= 5

    def rules() -> list[dict[str, Any]]:
        groups = prom.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    loaded = wait_for(
        rules,
        SCRAPE_TIMEOUT,
        until=lambda rs: len(rs) == expected and all(r["health"] == "ok" for r in rs),
        what=f"{expected} rules loaded and evaluated",
    )
    assert {r["type"] for r in loaded} == {"alerting"}
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], "a healthy set fires no alert"


def test_every_dashboard_query_runs_on_prometheus(observed: Observed) -> None:
    """Each panel's PromQL (Grafana variables substituted) is accepted by Prometheus."""
    prom = observed.prometheus
    exprs = dashboard_exprs()
    assert exprs
    # Every target scraped, and the lag histogram grown between two scrapes:
    # the queries below see data.
    wait_for(
        lambda: prom.query('up{job=~"filewatch-.*"} == 1'),
        SCRAPE_TIMEOUT,
        until=lambda up: len(up) == 1 + len(observed.watchers),
        what="every target up",
    )
    wait_for_lag(observed)
    empty = []
    for expr in exprs:
        promql = expr
        for variable, value in GRAFANA_VARIABLES.items():
            promql = promql.replace(variable, value)
        assert "$" not in promql, f"unknown Grafana variable in {expr!r}"
        if not prom.query(promql):
            empty.append(expr)
    # Queries of events that did not happen (resyncs, errors...) may be empty;
    # the core panels must show data.
    for needed in ("filewatch_sync_lag_seconds", "filewatch_watchers", "filewatch_files"):
        assert not [e for e in empty if f"{needed}_" in e or f"{needed}{{" in e], (
            f"dashboard queries on {needed} returned nothing: {empty}"
        )


def test_promtool_checks_pass(promtool_bin: str) -> None:
    """observability/check.sh: promtool check config, check rules, test rules, dashboard JSON."""
    result = subprocess.run(
        ["bash", str(OBSERVABILITY / "check.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{promtool_bin}: {result.stdout}\n{result.stderr}"
    assert "SUCCESS" in result.stdout
