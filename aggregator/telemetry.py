"""Prometheus metrics of the aggregator, each on an explicitly injected registry."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Dense around 10-100 ms, where a healthy sync lag lives.
LAG_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04,
    0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """Every metric the aggregator exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sync_lag = Histogram(
            "filewatch_sync_lag_seconds",
            "Watcher observed a change -> aggregator applied it. For the Go watcher, "
            "which sends no observation time, measured from the PATCH's arrival.",
            ["protocol"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.watchers = Gauge(
            "filewatch_watchers", "Watchers connected, by protocol", ["protocol"], registry=r
        )
        self.files = Gauge("filewatch_files", "Files in the index, all watchers", registry=r)
        self.watcher_files = Gauge(
            "filewatch_watcher_files", "Files per watcher", ["node"], registry=r
        )
        self.sequence_behind = Gauge(
            "filewatch_watcher_sequence_behind",
            "Sequence announced by a watcher minus sequence applied (skew-free lag)",
            ["node"],
            registry=r,
        )
        self.last_seen = Gauge(
            "filewatch_watcher_last_seen_timestamp_seconds",
            "Unix time of a watcher's last heartbeat, hello or batch",
            ["node"],
            registry=r,
        )
        self.changes = Counter(
            "filewatch_changes_applied", "Changes applied to the index, by op", ["op"], registry=r
        )
        self.snapshots = Counter(
            "filewatch_snapshots", "Snapshots installed, by reason", ["reason"], registry=r
        )
        self.resyncs = Counter(
            "filewatch_resyncs", "Resyncs asked of watchers, by reason", ["reason"], registry=r
        )
        self.errors = Counter(
            "filewatch_ingestion_errors", "Ingestion errors, by kind", ["kind"], registry=r
        )
        # Series at 0 from the start: rate() and increase() cannot see a counter's
        # first event when its series is born at 1, so an alert would miss it.
        for reason in ("gap", "behind", "refetch", "buffer_full", "lost"):
            self.resyncs.labels(reason)
        for kind in (
            "InvalidInputError", "UnknownWatcherError", "LimitExceededError",
            "UnauthenticatedError", "held_instances_full", "held_expired",
            "legacy_fetch_failed", "legacy_instance_mismatch", "legacy_list_bad_name",
        ):  # fmt: skip
            self.errors.labels(kind)
        self.watchers_expired = Counter(
            "filewatch_watchers_expired",
            "Watchers whose files were removed because their TTL ran out (vanished, no bye)",
            registry=r,
        )
        self.rejected = Counter(
            "filewatch_rejected_inputs", "Bad inputs refused, by endpoint and problem",
            ["endpoint", "problem"], registry=r,
        )  # fmt: skip
        self.duplicates = Counter(
            "filewatch_duplicate_batches", "Batches ignored as already applied", registry=r
        )
        self.readers = Gauge("filewatch_watch_readers", "WatchFiles readers", registry=r)
        self.readers_dropped = Counter(
            "filewatch_watch_readers_dropped", "WatchFiles readers dropped as slow", registry=r
        )
        self.event_clients = Gauge(
            "filewatch_event_clients", "GET /files/events clients", registry=r
        )
        self.event_clients_dropped = Counter(
            "filewatch_event_clients_dropped",
            "GET /files/events clients dropped as slow",
            registry=r,
        )
        self.grpc_requests = Counter(
            "filewatch_grpc_requests", "gRPC calls, by method and code", ["method", "code"],
            registry=r,
        )  # fmt: skip
        self.grpc_duration = Histogram(
            "filewatch_grpc_request_duration_seconds", "gRPC call duration, by method",
            ["method"], registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "filewatch_http_requests", "HTTP requests, by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "filewatch_http_request_duration_seconds", "HTTP request duration, by route",
            ["route"], registry=r,
        )  # fmt: skip
        self.http_connections_refused = Counter(
            "filewatch_http_connections_refused",
            "HTTP connections closed on arrival: --max-connections were open",
            registry=r,
        )
        # Every series with a known label set is born now, at 0, not at its first
        # event: an alert's rate() sees that first event, and the series' memory is
        # allocated with the rest of the start-up state, not in the middle of the
        # first load, where it would keep the load's freed memory from being reused.
        for protocol in ("grpc", "legacy"):
            self.sync_lag.labels(protocol)
            self.watchers.labels(protocol)
        for op in ("add", "remove", "modify"):
            self.changes.labels(op)
        for reason in ("new_instance", "resync"):
            self.snapshots.labels(reason)
        for method in ("Sync", "ListFiles", "WatchFiles"):
            self.grpc_requests.labels(method, "OK")
            self.grpc_duration.labels(method)

    def declare_routes(self, routes: Iterable[str]) -> None:
        """Create the HTTP series of these routes (at 0), as `__init__` does for the rest."""
        for route in routes:
            self.http_requests.labels(route, "200")
            self.http_duration.labels(route)
