"""The streaming ingestion protocol's policy, protocol-neutral: the counterpart of `legacy`.

A watcher process holds one session (its Sync stream): it says hello with its
node name, epoch and last sequence; it is admitted or refused (watcher limit,
a name held by another live stream or by a legacy watcher); it resumes from
the position the aggregator holds for that epoch, or sends a snapshot; then
batches, each the next in sequence or answered with a resync; heartbeats that
show the position. A session that ends cleanly (goodbye, half-close) removes
its files at once; one that breaks keeps them for the TTL.

The transport (`grpc_sync`) turns wire messages into the calls below and their
answers (`Welcome`, `Ack`, `Resync`) back into messages; it decides nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from aggregator.errors import (
    AggregatorError,
    ConflictError,
    ExpiredError,
    InvalidInputError,
    LimitExceededError,
    ShuttingDownError,
    SupersededError,
)
from aggregator.index import BatchStatus, Meta, Op
from aggregator.liveness import Liveness
from aggregator.store import Store

log = structlog.get_logger(__name__)

PROTOCOL = "grpc"
MAX_NAME_FIELD = 256
"""Longest node name or epoch a hello may carry."""


@dataclass(frozen=True, slots=True)
class Hello:
    """Who a session is: its watcher's name, process epoch and last sequence sent."""

    node: str
    epoch: str
    folder: str = ""
    last_sequence: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    """The answer to a hello: resume after `applied_sequence`, or send a snapshot."""

    resume: bool
    applied_sequence: int
    epoch: str  # echoed when resuming


@dataclass(frozen=True, slots=True)
class Ack:
    """The position the aggregator has applied."""

    applied_sequence: int


@dataclass(frozen=True, slots=True)
class Resync:
    """The aggregator cannot go on from the session's position: send a snapshot."""

    reason: str
    applied_sequence: int


class Session:
    """One stream: who it is, where it stands, and how to end it from outside."""

    def __init__(self) -> None:
        self.node = ""
        self.epoch = ""
        self.in_snapshot = False
        self.snapshot_count = 0
        self.awaiting_snapshot = False
        self.stop_reason: AggregatorError | None = None
        # The transport's task while it serves the session: what `kick` cancels.
        self.task: asyncio.Task[object] | None = None

    def kick(self, reason: AggregatorError) -> None:
        """End the session from outside (superseded, expired, shutdown).

        Cancels the transport's task wherever it waits (a read, mostly), so that
        an idle stream costs one pending read and nothing else; `serve` turns
        that cancellation into `reason`.
        """
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        if self.task is not None:
            self.task.cancel()


class Sessions:
    """Every streaming watcher's session, and the rules they follow."""

    def __init__(
        self,
        store: Store,
        liveness: Liveness,
        *,
        max_watchers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._liveness = liveness
        self._max_watchers = max_watchers
        self._clock = clock
        self._owners: dict[str, Session] = {}
        self._open: set[Session] = set()

    @property
    def stream_count(self) -> int:
        """Sessions open now."""
        return len(self._open)

    # ------------------------------------------------------------ lifetime

    def open(self) -> Session:
        """A new stream, before its hello."""
        session = Session()
        self._open.add(session)
        return session

    async def serve(self, session: Session, run: Callable[[], Awaitable[bool]]) -> bool:
        """Await `run()` (the transport's conversation) for `session`; True if it ended cleanly.

        A kick meanwhile cancels it and raises the kick's reason instead.
        """
        task = asyncio.current_task()
        assert task is not None
        session.task = task
        try:
            return await run()
        except asyncio.CancelledError:
            if session.stop_reason is None:
                raise  # the transport cancelled the call itself
            task.uncancel()
            raise session.stop_reason from None
        finally:
            session.task = None  # a kick from now on has nothing to interrupt

    def close(self, session: Session, clean: bool) -> None:
        """The stream ended: cleanly, its files go at once; broken, they stay for the TTL."""
        self._open.discard(session)
        node = session.node
        if not node or self._owners.get(node) is not session:
            return
        del self._owners[node]
        self._store.index.abort_snapshot(node)
        if clean:
            removed = self._store.remove_watcher(node)
            self._liveness.forget(node)
            log.info("watcher_left", node=node, files_removed=removed)
        else:
            self._liveness.vanished(node, self._clock())
            log.info("watcher_vanished", node=node, ttl=self._liveness.ttl)
        self._update_watcher_gauge()

    def expired(self, node: str) -> None:
        """The reaper removed `node`, silent for the TTL: end its session if one is open.

        A frozen watcher's stream stays open until keepalive gives up; once it
        wakes it reconnects and sends its list again.
        """
        session = self._owners.pop(node, None)
        if session is not None:
            self._store.index.abort_snapshot(node)
            session.kick(ExpiredError("no message for the TTL: the files were removed"))
            self._update_watcher_gauge()

    def shutdown(self) -> None:
        """End every open session (graceful shutdown); their files stay for the TTL."""
        for session in list(self._open):
            session.kick(ShuttingDownError("aggregator shutting down"))

    def heard(self, session: Session) -> None:
        """Any message: the session's watcher is alive (hot path)."""
        self._liveness.heard(session.node, self._clock())

    def applied(self, session: Session) -> int:
        """The sequence applied for the session's watcher (0 if none)."""
        info = self._store.index.watcher(session.node)
        return info.applied_sequence if info else 0

    # ------------------------------------------------------------ messages

    def hello(self, session: Session, hello: Hello) -> Welcome:
        """Admit a watcher (or raise why not) and say where it resumes."""
        for field_name in ("node", "epoch"):
            value = getattr(hello, field_name)
            if not value or len(value) > MAX_NAME_FIELD:
                raise InvalidInputError(f"hello.{field_name} must be 1-{MAX_NAME_FIELD} characters")
        index = self._store.index
        info = index.watcher(hello.node)
        if info is None and hello.node not in self._owners:
            # Sessions still sending their first snapshot hold a place too:
            # otherwise any number of new watchers saying hello at once get in.
            pending = sum(1 for node in self._owners if index.watcher(node) is None)
            if index.watcher_count + pending >= self._max_watchers:
                raise LimitExceededError(f"at most {self._max_watchers} watchers")
        previous = self._owners.get(hello.node)
        if previous is not None and previous.epoch != hello.epoch:
            raise ConflictError(
                f"watcher name {hello.node!r} is held by another live stream; "
                "give each watcher its own --name"
            )
        if self._liveness.protocol_of(hello.node) not in (None, PROTOCOL):
            raise ConflictError(f"watcher name {hello.node!r} is held by a legacy watcher")
        if previous is not None:  # the same process reconnected: its old stream is dead
            previous.kick(SupersededError("superseded by a newer stream of this watcher"))
        session.node, session.epoch = hello.node, hello.epoch
        self._owners[hello.node] = session
        self._liveness.seen(hello.node, PROTOCOL, self._clock())
        self._update_watcher_gauge()
        resume = (
            info is not None
            and info.epoch == hello.epoch
            and info.synced
            and info.applied_sequence <= hello.last_sequence
        )
        applied = info.applied_sequence if resume and info else 0
        log.info(
            "watcher_hello",
            node=hello.node,
            folder=hello.folder,
            epoch=hello.epoch,
            resume=resume,
            applied_sequence=applied,
            last_sequence=hello.last_sequence,
        )
        return Welcome(resume, applied, hello.epoch if resume else "")

    def chunk(self, session: Session, files: list[tuple[bytes, Meta]]) -> None:
        """Part of a snapshot, built aside."""
        if not session.in_snapshot:
            self._store.index.begin_snapshot(session.node, session.epoch)
            session.in_snapshot, session.snapshot_count = True, 0
            session.awaiting_snapshot = False
        session.snapshot_count += len(files)
        self._store.index.extend_snapshot(session.node, files)

    def snapshot_end(self, session: Session, sequence: int, count: int) -> Ack:
        """The end of a snapshot: checked against what came, then swapped in."""
        index = self._store.index
        if not session.in_snapshot:
            index.begin_snapshot(session.node, session.epoch)  # an empty folder
            session.snapshot_count = 0
        session.in_snapshot = False
        session.awaiting_snapshot = False
        if count != session.snapshot_count:
            index.abort_snapshot(session.node)
            raise InvalidInputError(
                f"snapshot end says {count} files, {session.snapshot_count} were sent"
            )
        had = index.watcher(session.node)
        reason = "new_instance" if had is None or not had.synced else "resync"
        events = self._store.commit_snapshot(session.node, sequence, reason)
        log.info(
            "snapshot_installed",
            node=session.node,
            files=count,
            changed=len(events),
            sequence=sequence,
        )
        return Ack(sequence)

    def batch(
        self,
        session: Session,
        sequence: int,
        changes: list[tuple[Op, bytes, Meta]],
        *,
        observed_ns: int,
        traceparent: str,
        tracestate: str,
    ) -> Resync | None:
        """Apply a batch if it is the next; a resync if the session's list is not whole."""
        if session.in_snapshot:
            raise InvalidInputError("batch sent inside a snapshot")
        if session.awaiting_snapshot:
            return None  # in flight before our resync request; the snapshot covers it
        if self._store.index.watcher(session.node) is None:
            # Changes to a list we do not hold: we need the list first.
            return self._resync(session, "gap", 0)
        result = self._store.apply_batch(
            session.node,
            session.epoch,
            sequence,
            changes,
            protocol=PROTOCOL,
            observed_ns=observed_ns,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        self._store.position(session.node, sequence, result.applied_sequence)
        if result.status is BatchStatus.GAP:
            return self._resync(session, "gap", result.applied_sequence)
        return None

    def heartbeat(self, session: Session, sequence: int, want_ack: bool) -> Ack | Resync | None:
        """The watcher's position when idle: a resync if it is ahead of us, else an Ack if
        it asks for one (a barrier), else nothing: a live watcher needs no answer."""
        info = self._store.index.watcher(session.node)
        applied = info.applied_sequence if info else 0
        self._store.position(session.node, sequence, applied)
        if (
            info is not None
            and info.synced
            and not session.in_snapshot
            and not session.awaiting_snapshot
            and sequence > applied
        ):
            # The watcher has sent more than we applied and not resent it.
            return self._resync(session, "behind", applied)
        return Ack(applied) if want_ack else None

    # ------------------------------------------------------------ internals

    def _resync(self, session: Session, reason: str, applied: int) -> Resync:
        session.awaiting_snapshot = True
        self._store.metrics.resyncs.labels(reason).inc()
        log.info("resync_requested", node=session.node, reason=reason, applied_sequence=applied)
        return Resync(reason, applied)

    def _update_watcher_gauge(self) -> None:
        counts = self._liveness.count_by_protocol()
        self._store.metrics.watchers.labels(PROTOCOL).set(counts.get(PROTOCOL, 0))
