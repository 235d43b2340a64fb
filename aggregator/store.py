"""The index's owner: applies changes, publishes events, keeps metrics and history.

One `Store` per aggregator, used only from the event loop. Both ingestion
adapters (gRPC and legacy HTTP) call the same methods, so the core stays
protocol-neutral. Readers (WatchFiles, /files/events) subscribe with a bounded
queue and are dropped, never buffered without end, when they fall behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Iterable, Sequence

from opentelemetry.trace import SpanKind, Tracer
from prometheus_client import Gauge, Histogram

from aggregator.errors import LimitExceededError
from aggregator.index import (
    BatchResult,
    BatchStatus,
    Event,
    EventKind,
    Index,
    Key,
    Meta,
    Op,
    count_kinds,
)
from aggregator.telemetry import Metrics
from common.tracing import extract

_OP_LABEL = {EventKind.ADDED: "add", EventKind.REMOVED: "remove", EventKind.MODIFIED: "modify"}
_SKIP_BUDGET = 10_000  # events skipped in one step of the loop, at most


class _Again(enum.Enum):
    AGAIN = "again"


AGAIN = _Again.AGAIN
"""`EventQueue._take` skipped its budget of events and found none to deliver yet."""


class EventQueue:
    """A reader's unread events, as references to the published tuples.

    One publish is one shared, immutable tuple: a snapshot of a million files
    costs each reader one reference, not a million. `qsize()` counts events.

    Each tuple is queued with the cursor of the reader's list at that moment
    (see `Subscriber.cursor`): its events whose key sorts after that cursor are
    skipped when read, since the list read those keys later and shows them.
    """

    def __init__(self) -> None:
        self._parts: deque[tuple[Sequence[Event], Key | None] | None] = deque()
        self._offset = 0  # events of _parts[0] already read
        self._size = 0
        self._ready = asyncio.Event()

    def qsize(self) -> int:
        """Unread events (those to be skipped included)."""
        return self._size

    def empty(self) -> bool:
        """Nothing queued (not even the end marker)."""
        return not self._parts

    def put_many(self, events: Sequence[Event], cursor: Key | None = None) -> None:
        """Append one published tuple (shared, never copied), with the list's cursor."""
        if events:
            self._parts.append((events, cursor))
            self._size += len(events)
            self._ready.set()

    def put_nowait(self, item: Event | None) -> None:
        """Append one event, or None: the end."""
        if item is None:
            self._parts.append(None)
            self._ready.set()
        else:
            self.put_many((item,))

    def _take(self, budget: int) -> Event | _Again | None:
        """The next event to deliver, None at the end, or AGAIN after `budget` skips."""
        parts = self._parts
        item: Event | _Again | None = AGAIN
        while parts and budget > 0:
            part = parts[0]
            if part is None:
                parts.popleft()
                item = None
                break
            events, cursor = part
            event = events[self._offset]
            self._offset += 1
            self._size -= 1
            if self._offset == len(events):
                parts.popleft()
                self._offset = 0
            if cursor is None or event.key <= cursor:
                item = event
                break
            budget -= 1  # the list already showed this change
        if not parts:
            self._ready.clear()
        return item

    def get_nowait(self) -> Event | None:
        """The next event (or None at the end); raises asyncio.QueueEmpty."""
        while self._parts:
            item = self._take(_SKIP_BUDGET)
            if item is not AGAIN:
                return item
        raise asyncio.QueueEmpty

    async def get(self) -> Event | None:
        """Wait for the next event (or None at the end)."""
        while True:
            while not self._parts:
                await self._ready.wait()
            item = self._take(_SKIP_BUDGET)
            if item is not AGAIN:
                return item
            await asyncio.sleep(0)  # skipped a long run: let the loop breathe

    def clear(self) -> None:
        """Drop everything unread."""
        self._parts.clear()
        self._offset = self._size = 0
        self._ready.clear()


class Subscriber:
    """One reader (WatchFiles, an event stream): its unread events; None in them means closed.

    `cursor` is where the reader's list stands while it is being sent: the key
    of the last entry it read from the index (b"" before the first page), or
    None when no list is being sent. Each publish is queued with it (O(1)).
    """

    def __init__(self, maxsize: int) -> None:
        # Bounded by Store.publish, not here: one publish (a big batch or
        # snapshot) may hold more than `maxsize` events and must still reach a
        # reader that has read everything before it; it is shared, not copied.
        self.queue = EventQueue()
        self.maxsize = maxsize
        self.reason: str | None = None
        self.slow = False
        self.cursor: Key | None = None

    def close(self, reason: str, *, slow: bool = False) -> None:
        """End the reader: drop what it has not read and wake it with None."""
        if self.reason is not None:
            return
        self.reason = reason
        self.slow = slow
        self.queue.clear()
        self.queue.put_nowait(None)


class Store:
    """The index plus its readers and metrics.

    Args:
        index: the core this store owns.
        metrics: where applied changes are counted.
        max_readers: WatchFiles readers at once.
        reader_queue: events buffered per reader before it is dropped as slow.
        history: recent events kept so that readers can resume from a version.
        tracer: where apply spans go; None when tracing is off.
    """

    def __init__(
        self,
        index: Index,
        metrics: Metrics,
        *,
        max_readers: int = 1000,
        reader_queue: int = 10_000,
        history: int = 10_000,
        tracer: Tracer | None = None,
    ) -> None:
        self.index = index
        self._tracer = tracer
        self.metrics = metrics
        self._max_readers = max_readers
        self._reader_queue = reader_queue
        self._history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[Subscriber] = set()
        self._streams: set[Subscriber] = set()  # HTTP event streams: bounded by their handler
        # node -> its (sequence_behind, last_seen) children: `labels()` costs more
        # than the `set()` itself, and every heartbeat sets both.
        self._position_gauges: dict[str, tuple[Gauge, Gauge]] = {}
        self._files_gauges: dict[str, Gauge] = {}  # node -> its watcher_files: every batch
        # The same for what every applied batch counts (fixed label sets).
        self._change_counters = {k: metrics.changes.labels(v) for k, v in _OP_LABEL.items()}
        self._lag_histograms: dict[str, Histogram] = {}

    # ------------------------------------------------------------ writing

    def commit_snapshot(self, node: str, sequence: int, reason: str) -> Sequence[Event]:
        """Swap in the snapshot received for `node` and publish what changed."""
        events = self.index.commit_snapshot(node, sequence)
        self.metrics.snapshots.labels(reason).inc()
        self._applied(node, events)
        return events

    def apply_batch(
        self,
        node: str,
        epoch: str,
        sequence: int,
        changes: Iterable[tuple[Op, bytes, Meta]],
        *,
        protocol: str,
        observed_ns: int | None = None,
        traceparent: str = "",
        tracestate: str = "",
    ) -> BatchResult:
        """Apply a batch, publish its events and record its sync lag.

        With tracing on, the apply is a span whose parent is the watcher's batch
        span, carried as a W3C `traceparent`.
        """
        if self._tracer is None:
            result = self.index.apply_batch(node, epoch, sequence, changes)
        else:
            changes = tuple(changes)
            with self._tracer.start_as_current_span(
                "aggregator.apply_batch",
                context=extract(traceparent, tracestate),
                kind=SpanKind.CONSUMER,
                attributes={
                    "filewatch.node": node,
                    "filewatch.protocol": protocol,
                    "filewatch.sequence": sequence,
                    "filewatch.count": len(changes),
                },
            ) as span:
                result = self.index.apply_batch(node, epoch, sequence, changes)
                span.set_attribute("filewatch.status", result.status.value)
                span.set_attribute("filewatch.applied", len(result.events))
        if result.status is BatchStatus.APPLIED:
            self._applied(node, result.events)
            if observed_ns:
                lag = max(0.0, (time.time_ns() - observed_ns) / 1e9)
                histogram = self._lag_histograms.get(protocol)
                if histogram is None:
                    histogram = self._lag_histograms[protocol] = self.metrics.sync_lag.labels(
                        protocol
                    )
                histogram.observe(lag)
        elif result.status is BatchStatus.DUPLICATE:
            self.metrics.duplicates.inc()
        return result

    def position(self, node: str, announced: int, applied: int) -> None:
        """Record a watcher's sign of life: the sequence it announced and what we applied."""
        gauges = self._position_gauges.get(node)
        if gauges is None:
            m = self.metrics
            gauges = self._position_gauges[node] = (
                m.sequence_behind.labels(node),
                m.last_seen.labels(node),
            )
        behind, seen = gauges
        behind.set(max(0, announced - applied))
        seen.set(time.time())

    def remove_watcher(self, node: str) -> int:
        """Remove a watcher and publish its removals; returns how many files went."""
        events = self.index.remove_watcher(node)
        self._applied(node, events)
        self._position_gauges.pop(node, None)
        self._files_gauges.pop(node, None)
        for gauge in (
            self.metrics.watcher_files,
            self.metrics.sequence_behind,
            self.metrics.last_seen,
        ):
            with contextlib.suppress(KeyError):  # never had that gauge
                gauge.remove(node)
        return len(events)

    def _applied(self, node: str, events: Sequence[Event]) -> None:
        for kind, count in count_kinds(events).items():
            self._change_counters[kind].inc(count)
        info = self.index.watcher(node)
        if info is not None:
            gauge = self._files_gauges.get(node)
            if gauge is None:
                gauge = self._files_gauges[node] = self.metrics.watcher_files.labels(node)
            gauge.set(info.file_count)
        self.metrics.files.set(len(self.index))
        self.publish(events)

    # ------------------------------------------------------------ readers

    @property
    def reader_count(self) -> int:
        """WatchFiles readers now: every one subscribed and not yet unsubscribed.

        A dropped reader counts until its call ends (its handler unsubscribes):
        until then it holds a place under `max_readers` and its last message.
        """
        return len(self._subscribers)

    def publish(self, events: Sequence[Event]) -> None:
        """Record applied events and hand them to every reader."""
        if not events:
            return
        if self._history.maxlen:  # only what it keeps: the events of an AddedRun are made lazily
            self._history.extend(events[-self._history.maxlen :])
        for readers in (self._subscribers, self._streams):
            for sub in readers:
                if sub.reason is not None:  # dropped or closed: its call is ending
                    continue
                if sub.queue.qsize() >= sub.maxsize:  # `maxsize` events unread: too slow
                    self.drop(sub, "reader too slow: its queue of events is full")
                    continue
                sub.queue.put_many(events, sub.cursor)

    def drop(self, sub: Subscriber, reason: str) -> None:
        """End a reader that does not keep up (counted); it stays a reader until unsubscribed."""
        if sub.reason is None:
            m = self.metrics
            (m.event_clients_dropped if sub in self._streams else m.readers_dropped).inc()
            sub.close(reason, slow=True)

    def subscribe(self, *, stream: bool = False) -> Subscriber:
        """Register a reader; events published from now on reach its queue.

        A WatchFiles reader counts under `max_readers`; an HTTP event stream
        (`stream`) does not: its handler keeps a limit of its own.
        """
        if stream:
            sub = Subscriber(self._reader_queue)
            self._streams.add(sub)
            return sub
        if len(self._subscribers) >= self._max_readers:
            raise LimitExceededError(f"at most {self._max_readers} WatchFiles readers at once")
        sub = Subscriber(self._reader_queue)
        self._subscribers.add(sub)
        self.metrics.readers.set(len(self._subscribers))
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a reader (idempotent)."""
        self._streams.discard(sub)
        self._subscribers.discard(sub)
        self.metrics.readers.set(len(self._subscribers))

    def history_since(self, version: int) -> tuple[Event, ...] | None:
        """Events after `version`, or None if the history no longer reaches back."""
        current = self.index.version
        if version == current:
            return ()
        if version > current or not self._history or self._history[0].version > version + 1:
            return None
        return tuple(ev for ev in self._history if ev.version > version)

    def close_readers(self, reason: str) -> None:
        """End every reader (shutdown); each counts until its handler unsubscribes."""
        for sub in (*self._subscribers, *self._streams):
            sub.close(reason)
