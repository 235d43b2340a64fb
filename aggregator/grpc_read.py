"""gRPC adapter of the read API: `filewatch.v1.FileIndex` (ListFiles, WatchFiles).

ListFiles pages the sorted index with opaque tokens. WatchFiles sends the list
page by page from the live index, then every change, from the store's events
(the same ones `/files/events` serves); domain errors become statuses through
`grpc_status`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections

import grpc
import orjson
import structlog

from aggregator.errors import InvalidInputError, LimitExceededError, ShuttingDownError
from aggregator.grpc_status import abort, status_of
from aggregator.index import Entry, Event, EventKind, make_key, node_suffix
from aggregator.names import rfc3339
from aggregator.store import Store, Subscriber
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["FileIndex"].full_name

MAX_EVENTS_PER_MESSAGE = 1000
"""The most changes sent together in one `events` message, whatever a reader asks."""

_KINDS = {
    EventKind.ADDED: pb.FileEvent.KIND_ADDED,
    EventKind.REMOVED: pb.FileEvent.KIND_REMOVED,
    EventKind.MODIFIED: pb.FileEvent.KIND_MODIFIED,
}


def set_entry(out: pb.FileEntry, entry: Entry) -> None:
    """Fill `out` with a core entry.

    `out` is a field of the message being built (`files.add()`, `event.entry`):
    filled in place, an entry is not built aside and then copied in, which
    takes twice as long.
    """
    # A proto string must be valid UTF-8: undecodable bytes become U+FFFD
    # here; raw_name carries the exact bytes.
    out.filename = entry.raw_name.decode("utf-8", "replace")
    out.raw_name = entry.raw_name
    out.node = entry.node
    # Unknown (a legacy watcher's file): size and time left 0, `modified` empty.
    if entry.size is not None:
        out.size = entry.size
    if entry.mtime_ns is not None:
        out.modified_unix_ns = entry.mtime_ns
        out.modified = rfc3339(entry.mtime_ns)


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
        self._events = _EventMessages()

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
                await abort(context, err)
        index = self._store.index
        page = index.page_after(after, size)
        next_token = ""
        if page and index.has_after(page[-1]):
            next_token = encode_page_token(page[-1])
        self._store.metrics.grpc_requests.labels("ListFiles", "OK").inc()
        response = pb.ListFilesResponse(
            version=index.version, count=len(index), next_page_token=next_token
        )
        add = response.files.add
        for entry in page:
            set_entry(add(), entry)
        return response

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
            await abort(context, err)
        code = grpc.StatusCode.OK
        try:
            await self._watch(request, context, sub)
            reason = sub.reason or "stream closed"
            ended = LimitExceededError(reason) if sub.slow else ShuttingDownError(reason)
            code = status_of(ended)
            if sub.slow:
                log.warning("watch_reader_dropped", peer=context.peer(), reason=sub.reason)
            # Delivered after what the reader has not read yet: until it reads
            # (or its connection goes), the call, its place among the readers
            # and its last message stay, and nothing else.
            await abort(context, ended)
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
                if not await self._send(context, sub, self._events.alone(event)):
                    return
            del backlog
        together = min(request.max_events_per_message, MAX_EVENTS_PER_MESSAGE)
        while True:
            item = await sub.queue.get()
            if item is None:
                return
            if together <= 1:
                if not await self._send(context, sub, self._events.alone(item)):
                    return
                continue
            data, ended = self._events.waiting(sub, item, together)
            if not await self._send(context, sub, data) or ended:
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
            message = pb.WatchFilesResponse(list=pb.ListChunk(version=version, done=done))
            add = message.list.files.add
            for entry in page:
                set_entry(add(), entry)
            del page
            if not await self._send(context, sub, message.SerializeToString()):
                return False
            if done:
                return True

    async def _send(self, context: grpc.aio.ServicerContext, sub: Subscriber, data: bytes) -> bool:
        """Write one serialized message; False if the reader is closed or did not take it in time.

        A write waits while the reader's flow-control window is full: one that
        waits `write_timeout` seconds means a reader that does not read.
        """
        if sub.reason is not None:
            return False
        try:
            async with asyncio.timeout(self._write_timeout):
                await context.write(data)
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


def _set_event(out: pb.FileEvent, event: Event) -> None:
    out.kind = _KINDS[event.kind]
    out.version = event.version
    set_entry(out.entry, event.entry)


class _EventMessages:
    """Each event's message, built and serialized once however many readers send it.

    Two forms: `alone`, a message of its own (`event`), and `grouped`, a message
    whose `events` holds it alone. Serialized protobuf messages concatenate into
    their merge, and a repeated field merges by appending: grouped forms joined
    are one message whose `events` holds them all, in order. So a reader's
    message of many events is a join of shared bytes, not a copy of each event.

    Keyed by the event's version (one per change); the most recent `size` of
    each form are kept. Readers that keep up are a few events behind the
    newest; one further back builds its own, so a stalled reader holds no more
    memory than its queue.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._alone: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._grouped: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def alone(self, event: Event) -> bytes:
        """`event` as a message of its own."""
        data = self._alone.get(event.version)
        if data is None:
            message = pb.WatchFilesResponse()
            _set_event(message.event, event)
            data = self._keep(self._alone, event.version, message.SerializeToString())
        return data

    def grouped(self, event: Event) -> bytes:
        """`event` as a message of `events` holding it alone."""
        data = self._grouped.get(event.version)
        if data is None:
            message = pb.WatchFilesResponse()
            _set_event(message.events.events.add(), event)
            data = self._keep(self._grouped, event.version, message.SerializeToString())
        return data

    def _keep(self, built: collections.OrderedDict[int, bytes], version: int, data: bytes) -> bytes:
        if len(built) >= self._size:
            # The oldest. Not `del d[next(iter(d))]` on a plain dict: its
            # iteration steps over every slot deleted so far, 1.4 us here.
            built.popitem(last=False)
        built[version] = data
        return data

    def waiting(self, sub: Subscriber, first: Event, most: int) -> tuple[bytes, bool]:
        """`first` and the events queued behind it, up to `most`, as one message; and whether
        the end came.
        """
        grouped = self.grouped
        parts = [grouped(first)]
        queue = sub.queue
        ended = False
        while len(parts) < most and not queue.empty():
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:  # only skipped events were left
                break
            if item is None:
                ended = True
                break
            parts.append(grouped(item))
        return b"".join(parts), ended


def add_file_index(service: FileIndexService, server: grpc.aio.Server) -> None:
    """Serve `service` as `filewatch.v1.FileIndex`.

    As the generated `add_FileIndexServicer_to_server`, except that WatchFiles
    writes messages it serialized itself (see `_EventMessages`).
    """
    handlers = {
        "ListFiles": grpc.unary_unary_rpc_method_handler(
            service.ListFiles,
            request_deserializer=pb.ListFilesRequest.FromString,
            response_serializer=pb.ListFilesResponse.SerializeToString,
        ),
        "WatchFiles": grpc.unary_stream_rpc_method_handler(
            service.WatchFiles,
            request_deserializer=pb.WatchFilesRequest.FromString,
            response_serializer=None,  # bytes, as they are
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
