"""`GET /files/events`: the index's changes as Server-Sent Events, from the store's events.

The same events as gRPC WatchFiles, one SSE event each, its `id:` the index
version it produced:

- `version` first, unless the client resumes: `{"version": V, "count": N}`;
- `add`, `remove`, `modify`: a `/files/?detail=1` entry plus its `"version"`;
- `reset` when the client resumes from a version the history no longer
  reaches: `{"version": V, "reason": ...}`; it reloads the list, events after V follow;
- `dropped` just before the end of a client that could not keep up.

A client resumes with `Last-Event-ID` (a browser's EventSource sends it when it
reconnects) or `?since=` (the version of the list it loaded; EventSource cannot
set a header on its first connect): it gets the events after that version, then
the live ones, and no list. Each client holds a bounded queue of references to
the store's shared events; one whose queue fills up, or whose write waits
`write_timeout`, is dropped. After `keepalive` seconds without an event a
comment line goes out, so that proxies keep the stream open (and a client
that went away is noticed).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web

from aggregator.errors import InvalidInputError, LimitExceededError
from aggregator.index import Entry, Event, EventKind
from aggregator.store import Store, Subscriber

log = structlog.get_logger(__name__)

PATH = "/files/events"
KEEPALIVE = b": keep-alive\n\n"
_KINDS = {EventKind.ADDED: b"add", EventKind.REMOVED: b"remove", EventKind.MODIFIED: b"modify"}
_WRITE_BYTES = 64 * 1024  # events ready at once go out in one write of about this much
_CACHED_FRAMES = 4096  # recent events' encodings, shared by every client (~4 us each to make)
_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
}

EntryEncoder = Callable[[Entry], bytes]
"""One `/files/?detail=1` entry as a JSON object."""


def frame(kind: bytes, data: bytes, version: int | None = None) -> bytes:
    """One SSE event: its type, its id if it has one, and its data (one line of JSON)."""
    if version is None:
        return b"event: %b\ndata: %b\n\n" % (kind, data)
    return b"event: %b\nid: %d\ndata: %b\n\n" % (kind, version, data)


def resume_point(request: web.Request) -> int | None:
    """The version a client has seen: its `Last-Event-ID` header, else `?since=`, else None.

    EventSource reconnects to the URL it was given, `?since=` included, with
    the id of the last event it got in `Last-Event-ID`: the header is newer.
    An empty `Last-Event-ID` says that there is no last event id. Both are
    checked: a malformed one is a 400 even when the other would win.
    """
    header = _version("header Last-Event-ID", request.headers.get("Last-Event-ID") or None)
    since = _version("query parameter 'since'", request.query.get("since"))
    return since if header is None else header


def _version(name: str, value: str | None) -> int | None:
    """An index version as a client spells it, None if absent; InvalidInputError if malformed."""
    if value is None:
        return None
    if value.isascii() and value.isdigit():
        try:
            return int(value)
        except ValueError:  # more digits than int() takes: no version is that large
            pass
    raise InvalidInputError(f"{name} must be a non-negative integer (an index version)")


@dataclass(eq=False, slots=True)
class _Client:
    sub: Subscriber
    request: web.Request
    writing: bool = False  # in a write: blocked on a client that does not read, if suspended

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class EventStreams:
    """The `/files/events` clients of one app, each fed by the store, at most `max_clients`.

    Args:
        store: whose events are streamed.
        max_clients: clients at once; one more is refused with a 429.
        write_timeout: seconds a write may wait for a client that does not read
            before that client is dropped.
        keepalive: seconds without an event after which a comment line is sent.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_clients: int = 1000,
        write_timeout: float = 5.0,
        keepalive: float = 15.0,
    ) -> None:
        self._store = store
        self._max_clients = max_clients
        self._write_timeout = write_timeout
        self._keepalive = keepalive
        self._clients: set[_Client] = set()
        self._encode: EntryEncoder | None = None  # set by `install`
        self._frames: OrderedDict[int, bytes] = OrderedDict()  # version -> its event, encoded
        self._closed = False

    @property
    def client_count(self) -> int:
        """Clients whose stream is open now (ending ones included, until they end)."""
        return len(self._clients)

    @property
    def writing_count(self) -> int:
        """Clients whose stream waits in a write now: clients that do not read, mostly."""
        return sum(1 for client in self._clients if client.writing)

    def install(self, app: web.Application, encode_entry: EntryEncoder) -> None:
        """Serve `GET /files/events` on `app`, entries encoded as `/files/?detail=1` does.

        The app's shutdown ends every stream, so that the runner's cleanup does
        not wait for them.
        """
        self._encode = encode_entry
        app.router.add_get(PATH, self.get_events)
        app.on_shutdown.append(self._on_shutdown)

    def close(self, reason: str) -> None:
        """End every stream and refuse new ones (shutdown).

        A stream blocked writing to a client that does not read is cut at once.
        """
        self._closed = True
        for client in self._clients:
            client.sub.close(reason)
            if client.writing:
                client.abort()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.close("aggregator shutting down")

    # ------------------------------------------------------------ the handler

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        """GET /files/events: the version (or the missed events, or a reset), then every change."""
        since = resume_point(request)
        if self._closed:
            raise web.HTTPServiceUnavailable(text="the aggregator is shutting down")
        if request.method == "HEAD":  # what a GET would start with, and no stream
            return web.Response(headers=_HEADERS)
        self._admit()
        store = self._store
        # One step of the loop from here to the history: every event after the
        # version read here reaches the queue, and none before it.
        sub = store.subscribe(stream=True)
        version, count = store.index.version, len(store.index)
        backlog = None if since is None else store.history_since(since)
        client = _Client(sub, request)
        self._clients.add(client)
        store.metrics.event_clients.set(len(self._clients))
        if since is None:
            head = frame(b"version", b'{"version":%d,"count":%d}' % (version, count), version)
        elif backlog is None:
            reason = f"history no longer reaches version {since}"
            head = frame(b"reset", orjson.dumps({"version": version, "reason": reason}), version)
        else:
            head = b""
        response = web.StreamResponse(headers=_HEADERS)
        response.force_close()  # the connection ends with the stream
        try:
            if await self._start(client, response, head, backlog or ()):
                await self._follow(client, response)
            await self._end(client, response)
        finally:
            self._clients.discard(client)
            store.unsubscribe(sub)
            store.metrics.event_clients.set(len(self._clients))
        return response

    def _admit(self) -> None:
        """Raise LimitExceededError if `max_clients` streams are open and live."""
        if len(self._clients) < self._max_clients:
            return
        for client in self._clients:  # those that went away since their last write
            if client.gone():
                client.sub.close("client gone")
        if sum(1 for c in self._clients if c.sub.reason is None) >= self._max_clients:
            raise LimitExceededError(
                f"at most {self._max_clients} {PATH} clients at once (--max-event-clients)"
            )

    async def _start(
        self, client: _Client, response: web.StreamResponse, head: bytes, backlog: Iterable[Event]
    ) -> bool:
        """Send the headers, `head` and the missed events; False if the stream is over."""
        try:
            await response.prepare(client.request)
        except OSError:
            client.sub.close("client gone")
            return False
        pieces, size = [head], len(head)
        for event in backlog:
            piece = self._event(event)
            pieces.append(piece)
            size += len(piece)
            if size >= _WRITE_BYTES:
                if not await self._send(client, response, b"".join(pieces)):
                    return False
                pieces, size = [], 0
        return not size or await self._send(client, response, b"".join(pieces))

    async def _follow(self, client: _Client, response: web.StreamResponse) -> None:
        """Send every event as it comes, those ready at once together; return once it ends."""
        queue = client.sub.queue
        while True:
            try:
                async with asyncio.timeout(self._keepalive):
                    item = await queue.get()
            except TimeoutError:
                if not await self._send(client, response, KEEPALIVE):
                    return
                continue
            pieces: list[bytes] = []
            size = 0
            while item is not None:
                piece = self._event(item)
                pieces.append(piece)
                size += len(piece)
                if size >= _WRITE_BYTES:
                    break
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if pieces and not await self._send(client, response, b"".join(pieces)):
                return
            if item is None:  # closed: dropped, or shutting down
                return

    async def _end(self, client: _Client, response: web.StreamResponse) -> None:
        """End the response: `dropped` first if it was; cut if the client does not take it."""
        if not response.prepared:
            return
        sub = client.sub
        tail = b""
        if sub.slow:
            log.warning("event_client_dropped", peer=client.request.remote, reason=sub.reason)
            tail = frame(b"dropped", orjson.dumps({"reason": sub.reason}))
        client.writing = True
        try:
            async with asyncio.timeout(self._write_timeout):
                if tail:
                    await response.write(tail)
                await response.write_eof()
        except (TimeoutError, OSError):
            client.abort()
        finally:
            client.writing = False

    async def _send(self, client: _Client, response: web.StreamResponse, data: bytes) -> bool:
        """Write `data`; False if the stream is over (closed, the client gone, or dropped now).

        A write waits only while the connection's buffers are full: one that
        waits `write_timeout` means a client that does not read.
        """
        sub = client.sub
        if sub.reason is not None:
            return False
        client.writing = True
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.write(data)
        except TimeoutError:
            self._store.drop(
                sub,
                f"client too slow: an event waited {self._write_timeout:g} s to be sent "
                "(--reader-write-timeout)",
            )
        except OSError:  # the connection is gone
            sub.close("client gone")
        finally:
            client.writing = False
        return sub.reason is None

    def _event(self, event: Event) -> bytes:
        """The SSE event of a change: its entry as `/files/?detail=1` shows it, and its version.

        Encoded once for all the clients that read it at about the same time.
        """
        frames = self._frames
        piece = frames.get(event.version)
        if piece is None:
            assert self._encode is not None, "EventStreams.install sets it"
            entry = self._encode(event.entry)
            piece = b'event: %b\nid: %d\ndata: %b,"version":%d}\n\n' % (
                _KINDS[event.kind],
                event.version,
                entry[:-1],  # the entry's object, left open for the version
                event.version,
            )
            frames[event.version] = piece
            if len(frames) > _CACHED_FRAMES:
                frames.popitem(last=False)
        return piece
