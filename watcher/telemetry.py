"""The watcher's Prometheus metrics and its tracer, injected into the parts that use them."""

from __future__ import annotations

from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge

STREAM_STATES = ["connecting", "syncing", "live", "backoff", "stopped"]


class WatcherMetrics:
    """Every metric a watcher exports, on one registry."""

    def __init__(
        self, registry: CollectorRegistry | None = None, tracer: Tracer | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tracer = tracer
        r = self.registry
        self.fs_events = Counter(
            "filewatch_watcher_fs_events", "File-system events seen", registry=r
        )
        # By target: a watcher may report to several aggregators (-aggregator a,b).
        target = ["target"]
        self.batches = Counter(
            "filewatch_watcher_batches_sent", "Batches (or PATCHes) sent", target, registry=r
        )
        self.changes = Counter(
            "filewatch_watcher_changes_sent", "Changes sent, by op", ["target", "op"], registry=r
        )
        self.snapshots = Counter(
            "filewatch_watcher_snapshots_sent", "Snapshots sent", target, registry=r
        )
        self.reconnects = Counter(
            "filewatch_watcher_reconnects", "Stream reconnects or request retries", target,
            registry=r,
        )  # fmt: skip
        self.behind = Gauge(
            "filewatch_watcher_batches_behind",
            "Batches taken from the folder and not yet sent to this target",
            target,
            registry=r,
        )
        self.rescans = Counter("filewatch_watcher_rescans", "Full rescans run", registry=r)
        self.rescan_changes = Counter(
            "filewatch_watcher_rescan_changes",
            "Changes found by rescans (missed events)",
            registry=r,
        )
        self.stream_state = Enum(
            "filewatch_watcher_stream_state", "State of the link to each aggregator", target,
            states=STREAM_STATES, registry=r,
        )  # fmt: skip
