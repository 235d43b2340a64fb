"""The legacy (Go watcher) ingestion protocol: hello, bye, PATCH /files, and list fetches.

The Go watcher numbers each change (`seqno`, +1 per change, 1 after its initial
scan), sends them as PATCHes it never retries, and says hello every 5 s. On the
first hello of an instance we fetch its list (a lower bound at its seqno),
install it as that instance's snapshot, then apply the PATCHes buffered
meanwhile, in seqno order. A missing seqno that does not arrive within a short
wait triggers a refetch. Fetches happen off the request path, only when needed
(first hello, a gap, a lost instance), never on a timer: the Go watcher's list
handler races with its file events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from aggregator.errors import ConflictError, InvalidInputError, LimitExceededError
from aggregator.index import NO_META, BatchStatus, Op
from aggregator.liveness import Liveness
from aggregator.names import invalid_name_reason
from aggregator.store import Store
from common.tasks import Supervisor

log = structlog.get_logger(__name__)

PROTOCOL = "legacy"
_MAX_GAP_BACKOFF = 32  # a gap refetch waits at most this many times --gap-wait


@dataclass(frozen=True, slots=True)
class LegacyOp:
    """One operation of a PATCH body, validated."""

    instance: str
    op: Op
    name: bytes
    seqno: int


@dataclass(frozen=True, slots=True)
class LegacyList:
    """A watcher's answer to `GET /files`, validated."""

    instance: str
    names: tuple[bytes, ...]
    seqno: int


# Fetches a watcher's list from (host, port); raises on any failure.
Fetcher = Callable[[str, int], Awaitable[LegacyList]]


@dataclass(frozen=True, slots=True)
class _Pending:
    """An operation waiting for its turn, with when it arrived and its trace context."""

    op: LegacyOp
    arrived_ns: int
    traceparent: str = ""


@dataclass(slots=True)
class _Instance:
    instance: str
    node: str
    host: str
    port: int
    applied: int = 0
    synced: bool = False
    fetching: bool = False
    needs_fetch: bool = True
    buffered: dict[int, list[_Pending]] = field(default_factory=dict)
    gap_since: float | None = None
    # Refetches in a row that left a gap open: each waits twice as long as the last.
    unclosed_gaps: int = 0
    # A remove of an ambiguous name waits for a refetch to confirm it (see _drain).
    verify_since: float | None = None
    refused: str = ""  # why its list could not be installed (a limit), if it could not
    last_hello: float = 0.0


@dataclass(slots=True)
class _Gone:
    """An instance that said bye, or lost its address to another: ignored until `forget_at`."""

    forget_at: float
    # A bye'd instance whose hellos go on past this time did not say that bye.
    bye_refuted_at: float | None = None


@dataclass(slots=True)
class _Held:
    """PATCH operations of an instance whose hello has not come yet."""

    first_seen: float
    ops: list[_Pending] = field(default_factory=list)


def node_name(host: str, port: int) -> str:
    """The readable watcher name of a legacy instance: its address and port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What the Go watcher sends for each undecodable byte: U+FFFD, in UTF-8. Two names
# that differ only there arrive as one, so a remove of such a name is ambiguous.
_REPLACEMENT = "\ufffd".encode()


def decode_filename(name: str) -> bytes:
    """A legacy filename as raw bytes (U+DC80..U+DCFF escapes map back to bytes)."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidInputError("filename contains a lone surrogate") from exc
    reason = invalid_name_reason(raw)
    if reason:
        raise InvalidInputError(reason)
    return raw


class LegacyIngest:
    """All legacy instances, their buffers, fetches and timers.

    Args:
        fetcher: gets a watcher's list; injected so that transport stays out.
        tasks: the owner of the fetches (run off the request path).
        gap_wait: seconds to wait for a missing seqno before refetching; after a
            refetch that leaves the gap open, twice as long each time (at most
            `_MAX_GAP_BACKOFF` times as long).
        max_held_instances: unknown instances whose PATCHes are held at once.
        max_buffered: operations buffered per instance before a refetch is forced.
        max_seqno_ahead: a PATCH whose seqno is more than this beyond the applied
            one of a synced instance is refused (nothing is applied).
        hello_period: seconds between a watcher's hellos (the Go watcher's: 5).
        missed_hellos: an instance is removed after this many hello periods
            without a hello, or after the TTL if that is longer.
    """

    def __init__(
        self,
        store: Store,
        liveness: Liveness,
        fetcher: Fetcher,
        tasks: Supervisor,
        *,
        max_watchers: int = 10_000,
        gap_wait: float = 1.0,
        max_held_instances: int = 1000,
        max_buffered: int = 100_000,
        max_seqno_ahead: int = 1_000_000,
        hello_period: float = 5.0,
        missed_hellos: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._liveness = liveness
        self._fetcher = fetcher
        self._max_watchers = max_watchers
        self._gap_wait = gap_wait
        self._max_held = max_held_instances
        self._max_buffered = max_buffered
        self._max_ahead = max_seqno_ahead
        self._hello_period = hello_period
        # Expiry counts missed hellos: a --ttl shorter than a few hello periods
        # must not remove a live watcher's files between two of its hellos.
        self._expiry = missed_hellos * hello_period
        self._clock = clock
        self._instances: dict[str, _Instance] = {}
        self._by_node: dict[str, str] = {}
        self._held: dict[str, _Held] = {}
        self._gone: dict[str, _Gone] = {}
        self._tasks = tasks  # the owner of our fetches

    # ------------------------------------------------------------ requests

    def hello(self, instance: str, host: str, port: int) -> None:
        """POST /hello from `host` (the peer address, never the body)."""
        now = self._clock()
        gone = self._gone.get(instance)
        if gone is not None:
            # A hello can race the bye (the Go watcher's ticker fires as it stops);
            # one half a hello period later means the instance lives on and the
            # bye was not its own (forged): it is fetched and listed again.
            if gone.bye_refuted_at is None or now < gone.bye_refuted_at:
                return
            del self._gone[instance]
            self._store.metrics.errors.labels("legacy_bye_contradicted").inc()
            log.warning("legacy_bye_contradicted", instance=instance, host=host, port=port)
        rec = self._instances.get(instance)
        if rec is not None and rec.host != host:
            raise ConflictError(f"instance {instance!r} belongs to another address")
        if rec is None:
            node = node_name(host, port)
            if self._liveness.protocol_of(node) not in (None, PROTOCOL):
                raise ConflictError(f"watcher name {node!r} is held by a gRPC watcher")
            index = self._store.index
            if index.watcher(node) is None and index.watcher_count >= self._max_watchers:
                raise LimitExceededError(f"at most {self._max_watchers} watchers")
            rec = _Instance(instance, node, host, port)
            self._instances[instance] = rec
            # A new instance on an address held by a live one: a restart, or a lie.
            # It takes the node only once the list fetched from that address names it
            # (in _fetch); until then the live instance keeps it.
            self._by_node.setdefault(node, instance)
            held = self._held.pop(instance, None)
            if held is not None:
                for pending in held.ops:
                    rec.buffered.setdefault(pending.op.seqno, []).append(pending)
            log.info("legacy_hello_new", node=node, instance=instance)
        rec.last_hello = now
        self._liveness.seen(rec.node, PROTOCOL, now, self._expiry, self._hello_period)
        announced = max(rec.buffered, default=rec.applied)
        self._store.position(rec.node, announced, rec.applied)
        self._update_gauge()
        if rec.needs_fetch and not rec.fetching:
            self._start_fetch(rec, "new_instance" if not rec.synced else "refetch")
        if rec.refused:
            raise LimitExceededError(rec.refused)

    def bye(self, instance: str, host: str) -> int:
        """POST /bye from `host`: the instance's files go at once; it stays gone."""
        now = self._clock()
        rec = self._instances.get(instance)
        if rec is not None and rec.host != host:
            raise ConflictError(f"instance {instance!r} belongs to another address")
        self._held.pop(instance, None)
        refuted_at = now + self._hello_period / 2
        if rec is None:
            self._gone[instance] = _Gone(now + self._liveness.ttl, refuted_at)
            return 0
        self._drop(instance, now, refuted_at)
        removed = self._store.remove_watcher(rec.node)
        self._liveness.forget(rec.node)
        self._update_gauge()
        log.info("legacy_bye", node=rec.node, instance=instance, files_removed=removed)
        return removed

    def patch(self, ops: list[LegacyOp], host: str, traceparent: str = "") -> None:
        """PATCH /files from `host`: apply in seqno order, buffer what cannot be applied yet.

        An instance's operations are taken only from the address of its hello.
        """
        now = self._clock()
        for i, op in enumerate(ops):  # all or nothing: refuse before anything is taken
            rec = self._instances.get(op.instance)
            if rec is None:
                continue
            if rec.host != host:
                raise ConflictError(f"instance {op.instance!r} belongs to another address")
            if rec.synced and op.seqno > rec.applied + self._max_ahead:
                raise InvalidInputError(
                    f"patch[{i}]: seqno {op.seqno} is more than {self._max_ahead} beyond "
                    f"the last applied ({rec.applied})"
                )
        arrived = time.time_ns()
        touched: set[str] = set()
        for op in ops:
            if op.instance in self._gone:
                continue
            rec = self._instances.get(op.instance)
            pending = _Pending(op, arrived, traceparent)
            if rec is None:
                self._hold(pending, now)
                continue
            if rec.synced and op.seqno <= rec.applied:
                self._store.metrics.duplicates.inc()
                continue
            rec.buffered.setdefault(op.seqno, []).append(pending)
            touched.add(op.instance)
        for instance in touched:
            rec = self._instances[instance]
            if sum(len(v) for v in rec.buffered.values()) > self._max_buffered:
                rec.buffered.clear()
                self._start_fetch(rec, "buffer_full")
            elif rec.synced and not rec.fetching:
                self._drain(rec, now)

    def _hold(self, pending: _Pending, now: float) -> None:
        instance = pending.op.instance
        held = self._held.get(instance)
        if held is None:
            if len(self._held) >= self._max_held:
                self._store.metrics.errors.labels("held_instances_full").inc()
                return
            held = self._held[instance] = _Held(now)
        if len(held.ops) < self._max_buffered:
            held.ops.append(pending)

    # ------------------------------------------------------------ applying

    def _drain(self, rec: _Instance, now: float) -> None:
        """Apply buffered operations that follow the applied seqno, in order."""
        for seqno in [s for s in rec.buffered if s <= rec.applied]:
            del rec.buffered[seqno]
        before = rec.applied
        while rec.applied + 1 in rec.buffered:
            seqno = rec.applied + 1
            entries = rec.buffered.pop(seqno)
            changes = []
            for p in entries:
                if p.op.op is Op.REMOVE and _REPLACEMENT in p.op.name:
                    # Maybe one of several names the Go watcher could not send apart:
                    # the watcher's own list, fetched shortly, says whether it went.
                    if rec.verify_since is None:
                        rec.verify_since = now
                    continue
                changes.append((p.op.op, p.op.name, NO_META))
            result = self._store.apply_batch(
                rec.node,
                rec.instance,
                seqno,
                changes,
                protocol=PROTOCOL,
                observed_ns=min(p.arrived_ns for p in entries),
                traceparent=entries[0].traceparent,
            )
            if result.status is not BatchStatus.APPLIED:  # the index lost it: refetch
                rec.buffered.clear()
                self._start_fetch(rec, "lost")
                return
            rec.applied = seqno
        if not rec.buffered:
            rec.gap_since = None
            rec.unclosed_gaps = 0
        elif rec.gap_since is None or rec.applied != before:
            rec.gap_since = now  # a (new) missing seqno: wait for it from now

    # ------------------------------------------------------------ fetching

    def _start_fetch(self, rec: _Instance, reason: str) -> None:
        if rec.fetching:
            return
        rec.fetching = True
        rec.needs_fetch = False
        if reason == "ambiguous_remove" or rec.verify_since is not None:
            rec.verify_since = None  # this fetch answers it
        self._tasks.spawn(f"fetch {rec.node}", self._fetch(rec, reason))

    async def _fetch(self, rec: _Instance, reason: str) -> None:
        started = time.perf_counter()
        try:
            listing = await self._fetcher(rec.host, rec.port)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any failure: retried at the next hello
            rec.fetching = False
            rec.needs_fetch = True
            self._store.metrics.errors.labels("legacy_fetch_failed").inc()
            log.warning("legacy_fetch_failed", node=rec.node, error=str(err) or type(err).__name__)
            return
        rec.fetching = False
        if self._instances.get(rec.instance) is not rec:
            return  # bye'd or replaced while we fetched
        owner = self._by_node.get(rec.node)
        if listing.instance != rec.instance and owner not in (None, rec.instance):
            # Not a restart: the watcher on that port is still `owner`.
            self._instances.pop(rec.instance, None)
            self._gone[rec.instance] = _Gone(self._clock() + self._liveness.ttl)
            self._store.metrics.errors.labels("legacy_instance_mismatch").inc()
            log.warning("legacy_hello_not_confirmed", node=rec.node, instance=rec.instance)
            return
        if listing.instance != rec.instance:
            rec.needs_fetch = True
            self._store.metrics.errors.labels("legacy_instance_mismatch").inc()
            log.warning("legacy_instance_mismatch", node=rec.node, listed=listing.instance)
            return
        if owner is not None and owner != rec.instance:
            self._drop(owner, self._clock())  # a confirmed restart: the old instance goes
        self._by_node[rec.node] = rec.instance
        self._install(rec, listing, reason, started)

    def _install(self, rec: _Instance, listing: LegacyList, reason: str, started: float) -> None:
        """Install a fetched list as the instance's snapshot, then apply what follows it."""
        index = self._store.index
        try:
            index.begin_snapshot(rec.node, rec.instance)
            index.extend_snapshot(rec.node, ((name, NO_META) for name in listing.names))
        except LimitExceededError as err:
            index.abort_snapshot(rec.node)
            info = index.watcher(rec.node)
            if info is not None and not info.synced:
                self._store.remove_watcher(rec.node)
            rec.refused, rec.needs_fetch = str(err), True
            self._store.metrics.errors.labels("LimitExceededError").inc()
            log.warning("legacy_list_refused", node=rec.node, error=str(err))
            return
        rec.refused = ""
        events = self._store.commit_snapshot(rec.node, listing.seqno, reason)
        if reason != "new_instance":
            self._store.metrics.resyncs.labels(reason).inc()
        rec.applied = listing.seqno
        rec.synced = True
        rec.gap_since = None
        implausible = self._drop_implausible(rec, listing.seqno)
        had_gap = reason == "gap"
        self._drain(rec, self._clock())
        if had_gap and rec.buffered:
            rec.unclosed_gaps += 1
            self._store.metrics.errors.labels("legacy_gap_unclosed").inc()
            if rec.unclosed_gaps == 1:  # once, not at every refetch
                log.warning(
                    "legacy_gap_unclosed",
                    node=rec.node,
                    applied=rec.applied,
                    next_buffered=min(rec.buffered),
                )
        log.info(
            "legacy_snapshot_installed",
            node=rec.node,
            reason=reason,
            files=len(listing.names),
            changed=len(events),
            seqno=listing.seqno,
            applied=rec.applied,
            implausible_dropped=implausible,
            seconds=round(time.perf_counter() - started, 4),
        )

    def _drop_implausible(self, rec: _Instance, listed_seqno: int) -> int:
        """Drop operations numbered more than `max_seqno_ahead` beyond the installed list.

        The same rule as for a PATCH to a synced instance, applied to what was
        buffered before its position was known (held before its first hello):
        waiting for the seqnos in between would refetch for ever.
        """
        limit = listed_seqno + self._max_ahead
        dropped = 0
        for seqno in [s for s in rec.buffered if s > limit]:
            dropped += len(rec.buffered.pop(seqno))
        if dropped:
            self._store.metrics.errors.labels("legacy_implausible_seqno").inc(dropped)
            log.warning(
                "legacy_implausible_seqno", node=rec.node, listed=listed_seqno, dropped=dropped
            )
        return dropped

    # ------------------------------------------------------------ timers

    def tick(self) -> None:
        """Periodic upkeep: refetch after a gap, forget old holds and byes."""
        now = self._clock()
        for rec in list(self._instances.values()):
            if not rec.synced or rec.fetching:
                continue
            wait = self._gap_wait * min(2**rec.unclosed_gaps, _MAX_GAP_BACKOFF)
            if rec.gap_since is not None and now - rec.gap_since >= wait:
                log.info(
                    "legacy_gap", node=rec.node, applied=rec.applied, buffered=len(rec.buffered)
                )
                self._start_fetch(rec, "gap")
            elif rec.verify_since is not None and now - rec.verify_since >= self._gap_wait:
                self._start_fetch(rec, "ambiguous_remove")
        ttl = self._liveness.ttl
        for rec in list(self._instances.values()):  # unconfirmed candidates that went quiet
            if self._by_node.get(rec.node) != rec.instance and now - rec.last_hello > ttl:
                del self._instances[rec.instance]
        for instance in [i for i, h in self._held.items() if now - h.first_seen > ttl]:
            del self._held[instance]
            self._store.metrics.errors.labels("held_expired").inc()
        for instance in [i for i, g in self._gone.items() if g.forget_at <= now]:
            del self._gone[instance]

    def expired(self, node: str) -> None:
        """The reaper removed `node` (no hello for the TTL): forget its instance."""
        # Not bye'd but lost: its next hello is a first hello again (fetch at once).
        instance = self._by_node.pop(node, None)
        if instance is not None:
            self._instances.pop(instance, None)
            self._update_gauge()

    def _drop(self, instance: str, now: float, bye_refuted_at: float | None = None) -> None:
        rec = self._instances.pop(instance, None)
        if rec is not None and self._by_node.get(rec.node) == instance:
            del self._by_node[rec.node]
        self._gone[instance] = _Gone(now + self._liveness.ttl, bye_refuted_at)

    def _update_gauge(self) -> None:
        self._store.metrics.watchers.labels(PROTOCOL).set(len(self._instances))

    async def run(self, period: float = 0.1) -> None:
        """Run `tick` until cancelled."""
        while True:
            await asyncio.sleep(period)
            self.tick()
