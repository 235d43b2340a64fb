"""The link to the aggregator, whatever the protocol: what both clients share.

`Client` is what the watcher needs of a client (`watcher.client.SyncClient` for
gRPC, `watcher.legacy_client.LegacyClient` for the legacy HTTP protocol);
`LinkStatus` is the bookkeeping both keep for /healthz and the metrics;
`backoff` is their delay before a retry.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Iterable
from typing import Protocol

import structlog

from watcher.telemetry import WatcherMetrics

OPS = ("add", "remove", "modify")
"""The ops a change is counted under (watcher.state.Op values)."""

log = structlog.get_logger(__name__)


class StreamState(enum.Enum):
    """Where the link stands, for /healthz and metrics."""

    CONNECTING = "connecting"
    SYNCING = "syncing"
    LIVE = "live"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class Client(Protocol):
    """A client that reports the folder state to the aggregator until `stop` is set."""

    @property
    def stream_state(self) -> StreamState:
        """Where the link stands."""
        ...

    @property
    def target(self) -> str:
        """The aggregator this client reports to, as given to -aggregator."""
        ...

    @property
    def refusal(self) -> str | None:
        """Why the aggregator refused us, until it accepts us again; None if it did not."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Report until `stop` is set, reconnecting on failure; then say goodbye and return."""
        ...


def backoff(failures: int, low: float, high: float) -> float:
    """Seconds to wait after `failures` in a row: capped exponential, full jitter.

    Uniform in [0, min(high, low * 2**failures)]; the exponent stops growing past
    the cap, so an outage of any length never overflows it.
    """
    return random.uniform(0, min(high, low * 2.0 ** min(failures, 64)))


class Wakeup:
    """ "The folder state has news", told to each client on its own event.

    The folder watch calls `set`; each client waits on and clears its own event
    (from `subscribe`), so one client's clear never hides a change from another.
    """

    def __init__(self) -> None:
        self._events: list[asyncio.Event] = []

    def subscribe(self) -> asyncio.Event:
        """A new event, set at every `set` from now on."""
        event = asyncio.Event()
        self._events.append(event)
        return event

    def set(self) -> None:
        """Wake every subscriber."""
        for event in self._events:
            event.set()


class LinkStatus:
    """The stream state (also exported as a metric) and the last refusal, of one client.

    Args:
        metrics: the watcher's metrics; this link's children carry `target` as label.
        target: the aggregator this link reports to, as given to -aggregator.
    """

    def __init__(self, metrics: WatcherMetrics | None, target: str) -> None:
        self.metrics = m = metrics or WatcherMetrics()
        self.target = target
        self._state_metric = m.stream_state.labels(target)
        self.batches_sent = m.batches.labels(target)
        self.snapshots_sent = m.snapshots.labels(target)
        self.reconnects = m.reconnects.labels(target)
        self._changes_sent = {op: m.changes.labels(target, op) for op in OPS}
        self._stream_state = StreamState.CONNECTING
        self._state_metric.state(self._stream_state.value)
        self.refusal: str | None = None
        """Why the aggregator refused the last attempt, until one is accepted: a gRPC
        `CODE: details`, or what the legacy aggregator answered a hello with a 4xx."""

    @property
    def stream_state(self) -> StreamState:
        """Where the link stands (also exported as a metric)."""
        return self._stream_state

    @stream_state.setter
    def stream_state(self, value: StreamState) -> None:
        self._stream_state = value
        self._state_metric.state(value.value)

    def count_sent(self, ops: Iterable[str]) -> None:
        """Count one batch (or PATCH) of changes with these ops as sent."""
        self.batches_sent.inc()
        for op in ops:
            self._changes_sent[op].inc()

    def _accepted(self, event: str) -> None:
        """The aggregator accepted us: a refusal, if any, is over (logged as `event`)."""
        if self.refusal is not None:
            log.info(event, previous_refusal=self.refusal)
            self.refusal = None
