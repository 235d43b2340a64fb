"""The aggregator's HTTP side: `GET /files/`, `/healthz`, `/metrics`.

`make_app` is the factory; dependencies live under typed `web.AppKey`s. One
middleware turns errors into `application/problem+json` and counts requests.
The `/files/` body is encoded once per index version and served from that
cache (with its gzip form and ETag) to every reader.
"""

from __future__ import annotations

import gzip
import io
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry.trace import SpanKind, Tracer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aggregator.errors import (
    AggregatorError,
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    UnauthenticatedError,
)
from aggregator.http_events import EventStreams
from aggregator.http_openapi import add_openapi_route
from aggregator.http_page import add_page_routes
from aggregator.http_watchers import add_watchers_route
from aggregator.index import Entry, Index, Key, entry_of, key_filename
from aggregator.legacy import LegacyIngest
from aggregator.legacy_http import LegacyGuard, add_routes
from aggregator.liveness import Liveness
from aggregator.names import rfc3339
from aggregator.store import Store
from aggregator.telemetry import Metrics
from common.tracing import extract

log = structlog.get_logger(__name__)

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"
_GZIP_MIN = 1024
_STREAM_MIN = 64 * 1024
_WRITE_CHUNK = 1024 * 1024
_HEAD = b'{"files":['

STORE: web.AppKey[Store] = web.AppKey("store", Store)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


def json_string(text: str) -> bytes:
    """A JSON string literal; lone surrogates (undecodable bytes) become \\udcXX escapes."""
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:
        return json.dumps(text).encode("ascii")


def encode_page(index: Index, keys: list[Key], detail: bool) -> bytes:
    """The entries of one page of the index, as comma-separated JSON objects."""
    if not detail:
        names = [key_filename(key) for key in keys]
        try:  # one orjson call for the whole page; names with undecodable bytes fall back
            return orjson.dumps([{"filename": name} for name in names])[1:-1]
        except orjson.JSONEncodeError:
            return b",".join(b'{"filename":' + json_string(name) + b"}" for name in names)
    return b",".join(_detail_entry(entry_of(key, index.meta(key))) for key in keys)


def _detail_entry(e: Entry) -> bytes:
    if e.mtime_ns is None or e.size is None:  # legacy watchers report no size or time
        return b'{"filename":%b,"node":%b,"size":null,"modified":null}' % (
            json_string(e.filename),
            json_string(e.node),
        )
    return b'{"filename":%b,"node":%b,"size":%d,"modified":"%b"}' % (
        json_string(e.filename),
        json_string(e.node),
        e.size,
        rfc3339(e.mtime_ns).encode(),
    )


@dataclass(slots=True)
class _Body:
    version: int
    plain: bytes
    etag: str
    gzipped: bytes | None = None


class FilesBodies:
    """The encoded `/files/` bodies, rebuilt at most once per index version.

    A body is the join of per-page segments, and a segment is re-encoded only
    when its page changed (its serial is new): after one change in a million
    entries, one page of ~1000 entries is encoded, and the rest is a memcpy.
    """

    def __init__(self, index: Index) -> None:
        self._index = index
        self._boot = secrets.token_hex(4)  # a restart must not reuse an ETag
        self._cache: dict[bool, _Body] = {}
        self._segments: dict[bool, dict[int, memoryview]] = {False: {}, True: {}}

    def get(self, detail: bool) -> _Body:
        """The body of the current version, encoding it if it is not cached."""
        index = self._index
        version = index.version
        body = self._cache.get(detail)
        if body is None or body.version != version:
            tail = b'],"version":%d,"count":%d}' % (version, len(index)) if detail else b"]}"
            plain = self._join(detail, tail)
            etag = f'"{self._boot}-{version}{"-d" if detail else ""}"'
            body = self._cache[detail] = _Body(version, plain, etag)
        return body

    def _join(self, detail: bool, tail: bytes) -> bytes:
        """The body: cached segments and fresh ones, separators interleaved.

        After a change nearly every segment is cached, and one join copies them
        with the few fresh ones. A first build (nothing cached) writes each page
        as soon as it is encoded instead: the encoded pages are never all held
        beside the body, and the page-sized blocks they would take are not left
        behind in the C allocator once freed (about 10 B per file at 1M files).
        Either way the cache then keeps each segment as a view into this body,
        not a copy of its own: the encoded list is held once.
        """
        cached = self._segments[detail]
        pages = self._index.pages()
        lengths: list[int] = []
        if cached:
            pieces: list[bytes | memoryview] = [_HEAD]
            for page in pages:
                known = cached.get(page.serial)
                segment = encode_page(self._index, page.keys, detail) if known is None else known
                pieces += (segment, b",")
                lengths.append(len(segment))
            if pages:
                pieces.pop()  # the last comma
            pieces.append(tail)
            plain = b"".join(pieces)
        else:
            out = io.BytesIO()
            out.write(_HEAD)
            for n, page in enumerate(pages):
                if n:
                    out.write(b",")
                lengths.append(out.write(encode_page(self._index, page.keys, detail)))
            out.write(tail)
            plain = out.getvalue()  # the buffer itself, not a copy
        view, offset, fresh = memoryview(plain), len(_HEAD), {}
        for page, length in zip(pages, lengths, strict=True):
            fresh[page.serial] = view[offset : offset + length]
            offset += length + 1  # and its comma
        self._segments[detail] = fresh  # pages that changed or went are forgotten
        return plain

    @staticmethod
    def gzipped(body: _Body) -> bytes:
        """The gzip form of a body, compressed once (fast level for large bodies)."""
        if body.gzipped is None:
            level = 1 if len(body.plain) > 1 << 20 else 6
            body.gzipped = gzip.compress(body.plain, compresslevel=level, mtime=0)
        return body.gzipped


BODIES: web.AppKey[FilesBodies] = web.AppKey("bodies", FilesBodies)


def problem(
    status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An RFC 9457 problem response."""
    payload = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    payload["instance"] = instance
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=PROBLEM_TYPE, headers=headers
    )


_ERROR_STATUS: dict[type[AggregatorError], int] = {
    InvalidInputError: 400,
    LimitExceededError: 429,
    UnauthenticatedError: 401,
    ConflictError: 409,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain and HTTP errors as problem+json; every request counted and timed."""
    metrics = request.app[METRICS]
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    start = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            metrics.rejected.labels(route_name, "body_too_large").inc()
        log.warning("http_error", path=request.path, method=request.method, status=exc.status)
        detail, headers = exc.text or exc.reason, None
        if isinstance(exc, web.HTTPMethodNotAllowed):  # the methods it does take, as a 405 must
            headers = {"Allow": exc.headers["Allow"]}
            detail = f"{request.method} is not allowed here; allowed: {exc.headers['Allow']}"
        response = problem(exc.status, exc.reason, detail, request.path, headers)
    except AggregatorError as err:
        status = next((code for cls, code in _ERROR_STATUS.items() if isinstance(err, cls)), 400)
        metrics.rejected.labels(route_name, type(err).__name__).inc()
        log.warning("http_rejected", path=request.path, error=str(err), status=status)
        response = problem(status, type(err).__name__, str(err), request.path)
    except Exception:
        log.exception("http_unexpected_error", path=request.path)
        response = problem(
            500, "Internal Server Error", "unexpected error; see the log", request.path
        )
    metrics.http_requests.labels(route_name, str(response.status)).inc()
    metrics.http_duration.labels(route_name).observe(time.perf_counter() - start)
    return response


_UNTRACED = frozenset({"/metrics", "/healthz"})


def tracing_middleware(tracer: Tracer) -> Middleware:
    """A span per HTTP request (not /metrics, /healthz), child of an incoming traceparent."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _UNTRACED:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=extract(
                request.headers.get("traceparent", ""), request.headers.get("tracestate", "")
            ),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            return response

    return middleware


_DETAIL = {"0": False, "false": False, "1": True, "true": True}


def _detail(request: web.Request) -> bool:
    """The `detail` query parameter: absent, 0, 1, true or false; anything else is a 400."""
    value = request.query.get("detail")
    if value is None:
        return False
    if value not in _DETAIL:
        raise web.HTTPBadRequest(text="query parameter 'detail' must be 0, 1, true or false")
    return _DETAIL[value]


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (q > 0)."""
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().removeprefix("q=").strip() if params.strip().startswith("q=") else "1"
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


async def get_files(request: web.Request) -> web.StreamResponse:
    """GET /files/: every file of every watcher, sorted by name then watcher."""
    bodies = request.app[BODIES]
    body = bodies.get(_detail(request))
    headers = {"ETag": body.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
    if_none_match = request.headers.get("If-None-Match", "")
    if if_none_match.strip() == "*" or body.etag in if_none_match:
        return web.Response(status=304, headers=headers)
    payload = body.plain
    if len(payload) >= _GZIP_MIN and accepts_gzip(request.headers.get("Accept-Encoding", "")):
        payload = bodies.gzipped(body)
        headers["Content-Encoding"] = "gzip"
    if len(payload) < _STREAM_MIN:
        return web.Response(body=payload, headers=headers, content_type=JSON_TYPE, charset="utf-8")
    return await _send_after_headers(request, payload, headers)


async def _send_after_headers(
    request: web.Request, payload: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    """A large body, written after its headers and in slices, never copied whole.

    `web.Response` sends its headers and body in one write, and on Python
    before 3.12.9 aiohttp joins the two first: a copy of the whole list on
    every read (36 MB at a million files). Slices of the cached body go to the
    socket as they are; only what the socket does not take at once is buffered,
    so a reader that stops reading holds one slice, not a copy of the list.
    """
    response = web.StreamResponse(headers=headers)
    response.content_type, response.charset = JSON_TYPE, "utf-8"
    response.content_length = len(payload)
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    view = memoryview(payload)
    try:
        for start in range(0, len(view), _WRITE_CHUNK):
            await response.write(view[start : start + _WRITE_CHUNK])
    except ConnectionError:  # the reader left mid-list: nothing to answer, aiohttp closes up
        log.debug("files_reader_left", length=len(view))
        return response
    await response.write_eof()
    return response


async def get_healthz(request: web.Request) -> web.Response:
    """GET /healthz: alive, with a few figures."""
    index = request.app[STORE].index
    payload = {"status": "ok", "files": len(index), "watchers": index.watcher_count}
    return web.Response(body=orjson.dumps(payload), content_type=JSON_TYPE)


async def get_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(
    store: Store,
    metrics: Metrics,
    *,
    legacy: tuple[LegacyIngest, LegacyGuard] | None = None,
    client_max_size: int = 1024**2,
    tracer: Tracer | None = None,
    liveness: Liveness | None = None,
    events: EventStreams | None = None,
) -> web.Application:
    """The aiohttp application of the aggregator, with the legacy endpoints if given.

    `liveness` tells `/watchers` how each watcher's link is; `events` serves
    `/files/events` (one with the defaults if not given).
    """
    middlewares: list[Middleware] = [error_middleware]
    if tracer is not None:
        middlewares.insert(0, tracing_middleware(tracer))
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app[STORE] = store
    app[METRICS] = metrics
    app[BODIES] = FilesBodies(store.index)
    # Both spellings answer directly: a redirect would turn a legacy PATCH into a GET.
    app.router.add_get("/files/", get_files)
    app.router.add_get("/files", get_files)
    (events or EventStreams(store)).install(app, _detail_entry)
    add_watchers_route(app, store.index, liveness)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/metrics", get_metrics)
    add_page_routes(app)
    add_openapi_route(app)
    if legacy is not None:
        add_routes(app, *legacy)
    metrics.declare_routes({r.resource.canonical for r in app.router.routes() if r.resource})
    return app
