"""gRPC adapters: the Sync ingestion stream and the FileIndex read service.

They translate proto messages to core types and domain errors to status codes
(one table, `_STATUS`); the decisions live in the store and the index.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import time
from collections.abc import Callable, Iterable

import grpc
import orjson
import structlog
from google.protobuf.message import DecodeError

from aggregator.errors import (
    AggregatorError,
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    UnauthenticatedError,
    UnknownWatcherError,
)
from aggregator.index import (
    BatchStatus,
    Entry,
    Event,
    EventKind,
    Meta,
    Op,
    make_key,
    node_suffix,
    pack_meta,
)
from aggregator.liveness import Liveness
from aggregator.names import invalid_name_reason, rfc3339
from aggregator.store import Store, Subscriber
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

PROTOCOL = "grpc"

_STATUS: dict[type[AggregatorError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownWatcherError: grpc.StatusCode.NOT_FOUND,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    ConflictError: grpc.StatusCode.ALREADY_EXISTS,
}

_OPS = {pb.OP_ADD: Op.ADD, pb.OP_REMOVE: Op.REMOVE, pb.OP_MODIFY: Op.MODIFY}
_KINDS = {
    EventKind.ADDED: pb.FileEvent.KIND_ADDED,
    EventKind.REMOVED: pb.FileEvent.KIND_REMOVED,
    EventKind.MODIFIED: pb.FileEvent.KIND_MODIFIED,
}
_MAX_NAME_FIELD = 256


def status_of(error: AggregatorError) -> grpc.StatusCode:
    """The gRPC status code of a domain error."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.UNKNOWN


def check_token(token: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
    """Raise UnauthenticatedError unless `authorization: Bearer <token>` matches."""
    if not token:
        return
    presented = ""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, credentials = value.partition(" ")
            presented = credentials.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise UnauthenticatedError("missing or wrong token")


def entry_to_pb(entry: Entry) -> pb.FileEntry:
    """A core entry as a proto FileEntry."""
    return pb.FileEntry(
        # A proto string must be valid UTF-8: undecodable bytes become U+FFFD
        # here; raw_name carries the exact bytes.
        filename=entry.raw_name.decode("utf-8", "replace"),
        raw_name=entry.raw_name,
        node=entry.node,
        # Unknown (a legacy watcher's file): size and time 0, and `modified` empty.
        size=entry.size or 0,
        modified_unix_ns=entry.mtime_ns or 0,
        modified="" if entry.mtime_ns is None else rfc3339(entry.mtime_ns),
    )


def changes_from_pb(batch: pb.Batch) -> list[tuple[Op, bytes, Meta]]:
    """Validate and convert a batch's changes; nothing is applied on error."""
    out = []
    for i, ch in enumerate(batch.changes):
        f, op = ch.file, _OPS.get(ch.op)
        if op is None:
            raise InvalidInputError(f"change {i}: unknown op {ch.op}")
        name = f.name
        reason = invalid_name_reason(name)
        if reason:
            raise InvalidInputError(f"change {i}: {reason}")
        out.append((op, name, pack_meta(f.size, f.mtime_ns)))
    return out


def files_from_pb(chunk: pb.SnapshotChunk) -> list[tuple[bytes, Meta]]:
    """Validate and convert a snapshot chunk."""
    out = []
    for i, f in enumerate(chunk.files):
        name = f.name
        reason = invalid_name_reason(name)
        if reason:
            raise InvalidInputError(f"snapshot file {i}: {reason}")
        out.append((name, pack_meta(f.size, f.mtime_ns)))
    return out


class _Stop(Exception):
    """The stream must end now: shutdown, or superseded by a newer stream."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _SyncStream:
    """State of one Sync stream: who it is and where it stands."""

    def __init__(self, service: SyncService, context: grpc.aio.ServicerContext) -> None:
        self.service = service
        self.context = context
        self.node = ""
        self.epoch = ""
        self.in_snapshot = False
        self.snapshot_count = 0
        self.awaiting_snapshot = False
        self.stop_reason: _Stop | None = None
        # The handler's task while it serves the stream: what `kick` cancels.
        self.task: asyncio.Task[object] | None = None

    def kick(self, code: grpc.StatusCode, details: str) -> None:
        """End this stream from outside (superseded, shutdown).

        Cancels the handler wherever it waits (a read, mostly), so that an idle
        stream costs one pending read and nothing else; `SyncService._serve`
        turns that cancellation into `stop_reason`.
        """
        if self.stop_reason is not None:
            return
        self.stop_reason = _Stop(code, details)
        if self.task is not None:
            self.task.cancel()

    async def read(self) -> object:
        """The next message, or grpc.aio.EOF."""
        try:
            return await self.context.read()
        except DecodeError as exc:
            raise InvalidInputError(f"malformed message: {exc}") from exc


class SyncService(pb_grpc.WatcherSyncServicer):
    """The ingestion side: one `Sync` stream per watcher process."""

    def __init__(
        self,
        store: Store,
        liveness: Liveness,
        *,
        token: str = "",
        max_watchers: int = 10_000,
        hello_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._liveness = liveness
        self._token = token
        self._max_watchers = max_watchers
        self._hello_timeout = hello_timeout
        self._clock = clock
        self._owners: dict[str, _SyncStream] = {}
        self._streams: set[_SyncStream] = set()

    @property
    def stream_count(self) -> int:
        """Sync streams open now."""
        return len(self._streams)

    def expired(self, node: str) -> None:
        """The reaper removed `node`, silent for the TTL: end its stream if one is open.

        A frozen watcher's stream stays open until keepalive gives up; once it
        wakes it reconnects and sends its list again.
        """
        stream = self._owners.pop(node, None)
        if stream is not None:
            self._store.index.abort_snapshot(node)
            stream.kick(grpc.StatusCode.ABORTED, "no message for the TTL: the files were removed")
            self._update_watcher_gauge()

    def shutdown(self) -> None:
        """End every open stream with UNAVAILABLE (graceful shutdown)."""
        for stream in list(self._streams):
            stream.kick(grpc.StatusCode.UNAVAILABLE, "aggregator shutting down")

    # grpc.aio allows a streaming handler to use context.read()/write() and
    # return None; the generated stub only knows the iterator style.
    async def Sync(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext,
    ) -> None:
        stream = _SyncStream(self, context)
        self._streams.add(stream)
        clean = False
        code = "OK"
        started = time.perf_counter()
        try:
            check_token(self._token, context.invocation_metadata())
            clean = await self._serve(stream)
        except _Stop as stop:
            code = stop.code.name
            await context.abort(stop.code, stop.details)
        except AggregatorError as err:
            status = status_of(err)
            code = status.name
            kind = type(err).__name__
            self._store.metrics.errors.labels(kind).inc()
            log.warning("sync_rejected", node=stream.node, error=str(err), code=code)
            await context.abort(status, str(err))
        finally:
            self._streams.discard(stream)
            self._ended(stream, clean)
            self._store.metrics.grpc_requests.labels("Sync", code).inc()
            self._store.metrics.grpc_duration.labels("Sync").observe(time.perf_counter() - started)

    def _ended(self, stream: _SyncStream, clean: bool) -> None:
        node = stream.node
        if not node or self._owners.get(node) is not stream:
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

    def _update_watcher_gauge(self) -> None:
        counts = self._liveness.count_by_protocol()
        self._store.metrics.watchers.labels(PROTOCOL).set(counts.get(PROTOCOL, 0))

    async def _serve(self, stream: _SyncStream) -> bool:
        """Run the stream; True if it ended cleanly. Raises _Stop if kicked meanwhile."""
        task = asyncio.current_task()
        assert task is not None
        stream.task = task
        try:
            return await self._converse(stream)
        except asyncio.CancelledError:
            if stream.stop_reason is None:
                raise  # grpc cancelled the call itself
            task.uncancel()
            raise stream.stop_reason from None
        finally:
            stream.task = None  # a kick from now on has nothing to interrupt

    async def _converse(self, stream: _SyncStream) -> bool:
        """Hello, then messages until the end; True on goodbye or half-close."""
        try:
            async with asyncio.timeout(self._hello_timeout):
                first = await stream.read()
        except TimeoutError:
            raise InvalidInputError("no hello within the hello timeout") from None
        if first is grpc.aio.EOF:
            return False
        if not isinstance(first, pb.WatcherMessage) or first.WhichOneof("kind") != "hello":
            raise InvalidInputError("the first message of a Sync stream must be a hello")
        await self._hello(stream, first.hello)
        heard, clock, node = self._liveness.heard, self._clock, stream.node
        while True:
            msg = await stream.read()
            heard(node, clock())
            if msg is grpc.aio.EOF:
                # grpc also ends the reads of a peer that died (SIGKILL, reset)
                # with EOF: tell a real half-close apart before removing files.
                return await self._half_closed(stream)
            assert isinstance(msg, pb.WatcherMessage)
            kind = msg.WhichOneof("kind")
            if kind == "batch":
                await self._batch(stream, msg.batch)
            elif kind == "snapshot_chunk":
                self._chunk(stream, msg.snapshot_chunk)
            elif kind == "snapshot_end":
                await self._snapshot_end(stream, msg.snapshot_end)
            elif kind == "heartbeat":
                await self._heartbeat(stream, msg.heartbeat)
            elif kind == "goodbye":
                return True
            elif kind == "hello":
                raise InvalidInputError("hello sent twice on one stream")
            else:
                raise InvalidInputError("empty message")

    async def _half_closed(self, stream: _SyncStream) -> bool:
        """Whether an EOF is a clean half-close, not a cancelled or broken call.

        A half-closed call can still be written to; on a cancelled or broken
        one the write fails, or grpc cancels this handler meanwhile.
        """
        info = self._store.index.watcher(stream.node)
        ack = pb.Ack(applied_sequence=info.applied_sequence if info else 0)
        try:
            await stream.context.write(pb.AggregatorMessage(ack=ack))
        except Exception:  # the call is gone: not a clean close
            return False
        return True

    async def _hello(self, stream: _SyncStream, hello: pb.Hello) -> None:
        for field_name in ("node", "epoch"):
            value = getattr(hello, field_name)
            if not value or len(value) > _MAX_NAME_FIELD:
                raise InvalidInputError(
                    f"hello.{field_name} must be 1-{_MAX_NAME_FIELD} characters"
                )
        index = self._store.index
        info = index.watcher(hello.node)
        if info is None and hello.node not in self._owners:
            # Streams still sending their first snapshot hold a place too:
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
            previous.kick(grpc.StatusCode.ABORTED, "superseded by a newer stream of this watcher")
        stream.node, stream.epoch = hello.node, hello.epoch
        self._owners[hello.node] = stream
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
        welcome = pb.Welcome(
            epoch=hello.epoch if resume else "", resume=resume, applied_sequence=applied
        )
        await stream.context.write(pb.AggregatorMessage(welcome=welcome))

    def _chunk(self, stream: _SyncStream, chunk: pb.SnapshotChunk) -> None:
        files = files_from_pb(chunk)
        if not stream.in_snapshot:
            self._store.index.begin_snapshot(stream.node, stream.epoch)
            stream.in_snapshot, stream.snapshot_count = True, 0
            stream.awaiting_snapshot = False
        stream.snapshot_count += len(files)
        self._store.index.extend_snapshot(stream.node, files)

    async def _snapshot_end(self, stream: _SyncStream, end: pb.SnapshotEnd) -> None:
        index = self._store.index
        if not stream.in_snapshot:
            index.begin_snapshot(stream.node, stream.epoch)  # an empty folder
            stream.snapshot_count = 0
        stream.in_snapshot = False
        stream.awaiting_snapshot = False
        if end.count != stream.snapshot_count:
            index.abort_snapshot(stream.node)
            raise InvalidInputError(
                f"snapshot end says {end.count} files, {stream.snapshot_count} were sent"
            )
        had = index.watcher(stream.node)
        reason = "new_instance" if had is None or not had.synced else "resync"
        events = self._store.commit_snapshot(stream.node, end.sequence, reason)
        log.info(
            "snapshot_installed",
            node=stream.node,
            files=end.count,
            changed=len(events),
            sequence=end.sequence,
        )
        ack = pb.Ack(applied_sequence=end.sequence)
        await stream.context.write(pb.AggregatorMessage(ack=ack))

    async def _batch(self, stream: _SyncStream, batch: pb.Batch) -> None:
        changes = changes_from_pb(batch)
        if stream.in_snapshot:
            raise InvalidInputError("batch sent inside a snapshot")
        if stream.awaiting_snapshot:
            return  # in flight before our resync request; the snapshot covers it
        if self._store.index.watcher(stream.node) is None:
            # Changes to a list we do not hold: we need the list first.
            await self._resync(stream, "gap", 0)
            return
        result = self._store.apply_batch(
            stream.node,
            stream.epoch,
            batch.sequence,
            changes,
            protocol=PROTOCOL,
            observed_ns=batch.observed_unix_ns,
            traceparent=batch.traceparent,
            tracestate=batch.tracestate,
        )
        self._store.position(stream.node, batch.sequence, result.applied_sequence)
        if result.status is BatchStatus.GAP:
            await self._resync(stream, "gap", result.applied_sequence)

    async def _heartbeat(self, stream: _SyncStream, beat: pb.Heartbeat) -> None:
        info = self._store.index.watcher(stream.node)
        applied = info.applied_sequence if info else 0
        self._store.position(stream.node, beat.sequence, applied)
        if (
            info is not None
            and info.synced
            and not stream.in_snapshot
            and not stream.awaiting_snapshot
            and beat.sequence > applied
        ):
            # The watcher has sent more than we applied and not resent it.
            await self._resync(stream, "behind", applied)
            return
        await stream.context.write(pb.AggregatorMessage(ack=pb.Ack(applied_sequence=applied)))

    async def _resync(self, stream: _SyncStream, reason: str, applied: int) -> None:
        stream.awaiting_snapshot = True
        self._store.metrics.resyncs.labels(reason).inc()
        log.info("resync_requested", node=stream.node, reason=reason, applied_sequence=applied)
        msg = pb.Resync(reason=reason, applied_sequence=applied)
        await stream.context.write(pb.AggregatorMessage(resync=msg))


def encode_page_token(entry: Entry) -> str:
    """An opaque token naming the last entry of a page."""
    return base64.urlsafe_b64encode(orjson.dumps([entry.raw_name.hex(), entry.node])).decode()


def decode_page_token(token: str) -> tuple[bytes, str]:
    """The (raw name, node) a page token names."""
    try:
        raw_hex, node = orjson.loads(base64.urlsafe_b64decode(token.encode()))
        return bytes.fromhex(raw_hex), str(node)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise InvalidInputError("malformed page_token") from exc


class FileIndexService(pb_grpc.FileIndexServicer):
    """The read side: ListFiles (paged) and WatchFiles (list, then changes).

    A WatchFiles reader costs its queue (references to shared event tuples, at
    most `reader_queue` events unread) and the one message being written (a
    list page: at most `default_page` entries and about `list_page_bytes` of
    names), not a copy of the index: measured, ~0.3 MiB per reader that does
    not read (tests/faults/test_readers.py). A reader whose message waits
    `write_timeout` seconds to be sent, or whose queue fills up, is dropped
    with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        store: Store,
        *,
        default_page: int = 1000,
        max_page: int = 10_000,
        write_timeout: float = 5.0,
        list_page_bytes: int = 64 * 1024,
        list_pages_per_turn: int = 1,
    ) -> None:
        self._store = store
        self._default_page = default_page
        self._max_page = max_page
        self._write_timeout = write_timeout
        self._list_page_bytes = list_page_bytes
        self._list_turns = _Turnstile(list_pages_per_turn)

    async def ListFiles(
        self,
        request: pb.ListFilesRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListFilesResponse:
        size = min(request.page_size or self._default_page, self._max_page)
        after = None
        if request.page_token:
            try:
                after = decode_page_token(request.page_token)
            except InvalidInputError as err:
                self._store.metrics.grpc_requests.labels("ListFiles", "INVALID_ARGUMENT").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        index = self._store.index
        page = index.page_after(after, size)
        next_token = ""
        if page and index.has_after(page[-1]):
            next_token = encode_page_token(page[-1])
        self._store.metrics.grpc_requests.labels("ListFiles", "OK").inc()
        return pb.ListFilesResponse(
            files=[entry_to_pb(e) for e in page],
            version=index.version,
            count=len(index),
            next_page_token=next_token,
        )

    async def WatchFiles(  # type: ignore[override]
        self,
        request: pb.WatchFilesRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        store = self._store
        try:
            sub = store.subscribe()
        except LimitExceededError as err:
            store.metrics.grpc_requests.labels("WatchFiles", "RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        code = grpc.StatusCode.OK
        try:
            await self._watch(request, context, sub)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if sub.slow else grpc.StatusCode.UNAVAILABLE
            if sub.slow:
                log.warning("watch_reader_dropped", peer=context.peer(), reason=sub.reason)
            # Delivered after what the reader has not read yet: until it reads
            # (or its connection goes), the call, its place among the readers
            # and its last message stay, and nothing else.
            await context.abort(code, sub.reason or "stream closed")
        finally:
            store.unsubscribe(sub)
            store.metrics.grpc_requests.labels("WatchFiles", code.name).inc()

    async def _watch(
        self, request: pb.WatchFilesRequest, context: grpc.aio.ServicerContext, sub: Subscriber
    ) -> None:
        """The list (or the missed events), then every event; returns once `sub` is closed."""
        store = self._store
        backlog = store.history_since(request.resume_version) if request.resume_version else None
        if backlog is None:
            if not await self._send_list(context, sub):
                return
        else:
            for event in backlog:
                if not await self._send(context, sub, _event_to_pb(event)):
                    return
            del backlog
        while True:
            item = await sub.queue.get()
            if item is None or not await self._send(context, sub, _event_to_pb(item)):
                return

    async def _send_list(self, context: grpc.aio.ServicerContext, sub: Subscriber) -> bool:
        """Send the list page by page from the live index; False if `sub` was closed meanwhile.

        Each page is read in one step of the loop, and the reader's cursor moves
        to its last key in that same step; events published meanwhile are queued
        with the cursor of their moment, and those on keys after it are skipped
        when read (the list read them later). So the list and the events that
        follow it add up to the index exactly, and a reader holds one page at a
        time, never a copy of the index.
        """
        index = self._store.index
        version = index.version  # the list starts from this version
        sub.cursor = b""  # before every key
        after: tuple[bytes, str] | None = None
        limit = self._default_page  # entries read per page: what fits the bytes, learnt
        while True:
            await self._list_turns.enter()
            read = index.page_after(after, limit)
            page = _cut(read, self._list_page_bytes)
            if len(page) < len(read):
                limit = len(page) + 1
            elif len(read) == limit:
                limit = min(2 * limit, self._default_page)
            del read
            done = not page or not index.has_after(page[-1])
            if done:
                sub.cursor = None  # from now on every event is delivered
            else:
                last = page[-1]
                after = (last.raw_name, last.node)
                sub.cursor = make_key(last.raw_name, node_suffix(last.node))
            message = pb.WatchFilesResponse(
                list=pb.ListChunk(files=[entry_to_pb(e) for e in page], version=version, done=done)
            )
            del page
            if not await self._send(context, sub, message):
                return False
            if done:
                return True

    async def _send(
        self, context: grpc.aio.ServicerContext, sub: Subscriber, message: pb.WatchFilesResponse
    ) -> bool:
        """Write one message; False if the reader is closed or did not take it in time (dropped).

        A write waits while the reader's flow-control window is full: one that
        waits `write_timeout` seconds means a reader that does not read.
        """
        if sub.reason is not None:
            return False
        try:
            async with asyncio.timeout(self._write_timeout):
                await context.write(message)
        except TimeoutError:
            self._store.drop(
                sub,
                f"reader too slow: not reading, its next message waited {self._write_timeout:g} s "
                "to be sent (--reader-write-timeout)",
            )
        return sub.reason is None


class _Turnstile:
    """Lets at most `per_turn` callers through per turn of the event loop, first come first served.

    Many readers streaming lists at once would otherwise each run a page (a few
    ms) in every turn of the loop, and everything else (GET /files/, batches,
    new calls) would wait for all of them in turn.
    """

    def __init__(self, per_turn: int) -> None:
        self._per_turn = per_turn
        self._left = per_turn
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._scheduled = False

    async def enter(self) -> None:
        """Return once it is the caller's turn."""
        if self._left > 0 and not self._waiters:
            self._left -= 1
            self._schedule()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule()
        await waiter

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """A new turn of the loop: `per_turn` more may pass, the longest waiting first."""
        self._scheduled = False
        self._left = self._per_turn
        while self._left and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(None)
                self._left -= 1
        if self._waiters or self._left < self._per_turn:
            self._schedule()


_ENTRY_OVERHEAD = 64  # bytes of a FileEntry beyond its names: numbers, `modified`, framing


def _cut(page: tuple[Entry, ...], budget: int) -> tuple[Entry, ...]:
    """The first entries of `page` whose encoding takes about `budget` bytes (at least one)."""
    size = 0
    for n, entry in enumerate(page):
        size += 2 * len(entry.raw_name) + len(entry.node) + _ENTRY_OVERHEAD
        if size > budget and n:
            return page[:n]
    return page


def _event_to_pb(event: Event) -> pb.WatchFilesResponse:
    return pb.WatchFilesResponse(
        event=pb.FileEvent(
            kind=_KINDS[event.kind], entry=entry_to_pb(event.entry), version=event.version
        )
    )
