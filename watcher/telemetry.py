"""The watcher's Prometheus metrics and its tracer, injected into the parts that use them."""

from __future__ import annotations

from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Counter, Enum

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
        self.batches = Counter(
            "filewatch_watcher_batches_sent", "Batches (or PATCHes) sent", registry=r
        )
        self.changes = Counter(
            "filewatch_watcher_changes_sent", "Changes sent, by op", ["op"], registry=r
        )
        self.snapshots = Counter("filewatch_watcher_snapshots_sent", "Snapshots sent", registry=r)
        self.reconnects = Counter(
            "filewatch_watcher_reconnects", "Stream reconnects or request retries", registry=r
        )
        self.rescans = Counter("filewatch_watcher_rescans", "Full rescans run", registry=r)
        self.rescan_changes = Counter(
            "filewatch_watcher_rescan_changes",
            "Changes found by rescans (missed events)",
            registry=r,
        )
        self.stream_state = Enum(
            "filewatch_watcher_stream_state", "State of the link to the aggregator",
            states=STREAM_STATES, registry=r,
        )  # fmt: skip
