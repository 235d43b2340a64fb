"""Every metric the alert rules and the dashboard use is exported by the running processes.

No Prometheus needed: the names are read from the PromQL of alerts.yml and
grafana-dashboard.json, and looked up in the /metrics text of a real
aggregator and watcher after a few changes. A histogram counts for its
_bucket, _count and _sum series; a counter for its _total series.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.observability.conftest import (
    dashboard_exprs,
    rule_exprs,
    start_aggregator,
    start_watcher,
)
from tests.support import ProcessTracker, wait_for

SYNC_TIMEOUT = 15.0

PROMETHEUS_SERIES = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)
"""Series Prometheus makes itself, for every target or rule."""

# ---------------------------------------------------------------- PromQL names

_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels excluded)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)  # ranges, subqueries, Grafana's [$__rate_interval]
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match[1], match[2]
        if call or name in _AGGREGATIONS or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job=~"filewatch-.*"} == 0', {"up"}),
        (
            "histogram_quantile(0.99, sum by (le, protocol) "
            "(rate(filewatch_sync_lag_seconds_bucket[$__rate_interval])))",
            {"filewatch_sync_lag_seconds_bucket"},
        ),
        ('time() - a_seconds{node!="x y"} > 15', {"a_seconds"}),
        ("sum(rate(a_sum[5m])) / sum(rate(a_count[5m] offset 1h)) > 1e3", {"a_sum", "a_count"}),
        ("max without (instance) (b) * on (job) group_left (node) c:recorded", {"b", "c:recorded"}),
        ("count(x) by (kind) > bool 2 unless sum_over_time(y[1m:10s]) < Inf", {"x", "y"}),
    ],
)
def test_metric_names_reads_promql(expr: str, names: set[str]) -> None:
    """The reader below finds exactly the selected metric names."""
    assert metric_names(expr) == names


# ---------------------------------------------------------------- /metrics names


@dataclass(frozen=True)
class Exposition:
    """What a /metrics text offers: series names, and families by type."""

    samples: frozenset[str]
    types: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        """Read the Prometheus text format: TYPE lines and sample names."""
        samples: set[str] = set()
        types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(maxsplit=3)
                types[family] = kind
            elif line and not line.startswith("#"):
                match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
                assert match is not None, line
                samples.add(match[0])
        return cls(frozenset(samples), types)

    def series_names(self) -> set[str]:
        """Every series name a query may select, including families with no series yet.

        A labelled counter has no series until its first event (a resync, an
        error), but its family is declared and the query is right.
        """
        names = set(self.samples)
        for family, kind in self.types.items():
            if kind == "counter":
                names.add(family if family.endswith("_total") else f"{family}_total")
            elif kind in ("histogram", "gaugehistogram"):
                names.update(f"{family}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
            elif kind == "summary":
                names.update((family, f"{family}_count", f"{family}_sum"))
            else:
                names.add(family)
        return names


def exported(name: str, offered: set[str], types: dict[str, str]) -> bool:
    """Whether a referenced series name exists: as such, or a histogram's _bucket/_count/_sum."""
    if name in offered or name in PROMETHEUS_SERIES:
        return True
    for suffix, kinds in (
        ("_bucket", {"histogram", "gaugehistogram"}),
        ("_count", {"histogram", "gaugehistogram", "summary"}),
        ("_sum", {"histogram", "gaugehistogram", "summary"}),
    ):
        if name.endswith(suffix) and types.get(name.removesuffix(suffix)) in kinds:
            return True
    return False


def test_alerts_and_dashboard_use_only_exported_metrics(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    """Each metric used by alerts.yml and the dashboard is on a running process's /metrics."""
    referenced: dict[str, set[str]] = {}
    for source, exprs in (("alerts.yml", rule_exprs()), ("dashboard", dashboard_exprs())):
        assert exprs, f"no expressions found in {source}"
        for expr in exprs:
            for name in metric_names(expr):
                referenced.setdefault(name, set()).add(source)
    assert "filewatch_sync_lag_seconds_bucket" in referenced
    assert len(referenced) >= 10, referenced

    aggregator = start_aggregator(processes)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "seed.txt").write_text("seed\n")
    watcher = start_watcher(processes, folder, aggregator.grpc_url)
    changes = itertools.count()

    def probe() -> str:
        # An add and a remove per poll: changes made before the watcher's snapshot
        # went out are in the snapshot, not in batches with a sync lag.
        n = next(changes)
        (folder / f"new-{n}.txt").write_text("new\n")
        (folder / ("seed.txt" if n == 0 else f"new-{n - 1}.txt")).unlink()
        return aggregator.metrics()

    wait_for(
        probe,
        SYNC_TIMEOUT,
        until=lambda text: (
            'filewatch_changes_applied_total{op="remove"}' in text
            and "filewatch_sync_lag_seconds_count{" in text
        ),
        what="the aggregator to apply an add and a remove",
        interval=0.2,
    )

    offered: set[str] = set()
    types: dict[str, str] = {}
    for text in (aggregator.metrics(), watcher.metrics()):
        exposition = Exposition.parse(text)
        offered |= exposition.series_names()
        types |= exposition.types
    missing = {
        name: sorted(sources)
        for name, sources in sorted(referenced.items())
        if not exported(name, offered, types)
    }
    assert not missing, f"used but exported by no process: {missing}"
