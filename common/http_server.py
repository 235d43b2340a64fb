"""HTTP server limits shared by the aggregator and the watcher: an idle timeout, a connection cap.

- The idle timeout is aiohttp's own keep-alive timer (`make_runner`). Its
  RequestHandler arms it when a connection is made and again after each
  response, as a deadline that bytes received do not push back; when it fires
  while the connection waits for a request, the connection is closed: an idle
  keep-alive connection, or one whose request line or headers are still
  incomplete (trickled byte by byte or not). A request being handled is left
  alone: a long or streaming response, or a body still being read.
- The connection cap (`ConnectionLimit`, the protocol factory of `LimitedSite`
  listeners) closes a connection at once when the runner already has `limit`
  open, on all its listeners together, and counts and logs the refusals (one log
  line per `log_every` seconds at most, with the number refused since the last one).
- A request aiohttp's parser cannot take (`ProblemRequestHandler`) is answered
  as `application/problem+json` that never echoes what was sent: 414 for a URL
  over `MAX_URL_BYTES`, 431 for a header over `MAX_HEADER_BYTES` or more than
  `MAX_HEADERS` headers, 400 for anything else malformed.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from yarl import URL

log = structlog.get_logger(__name__)

REFUSED_LOG_EVERY = 10.0
"""Seconds between two log lines about refused connections, at most."""


MAX_URL_BYTES = 8190
"""Longest request target (path and query) taken; 414 beyond."""
MAX_HEADER_BYTES = 8192
"""Longest header value (and, with its value, name) taken; 431 beyond. It differs from
MAX_URL_BYTES on purpose: the parser's LineTooLong names only the limit it crossed."""
MAX_HEADERS = 128
"""Most headers in one request; 431 beyond."""

_MALFORMED: dict[type[Exception], str] = {
    http_exceptions.BadHttpMethod: "the request line's method is not an HTTP method",
    http_exceptions.BadStatusLine: "the request line is malformed",
    http_exceptions.InvalidURLError: "the request target is not a valid URL",
    http_exceptions.InvalidHeader: "a header is malformed",
    http_exceptions.ContentLengthError: "the body does not match its Content-Length",
    http_exceptions.TransferEncodingError: "the body's transfer encoding is malformed",
}


def _parse_problem(exc: BaseException, url_limit: int) -> tuple[int, str]:
    """The status and detail of a request the parser refused (nothing of the input in them)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        if exc.args[1:2] == (url_limit,):
            return 414, f"the request target is longer than {url_limit} bytes"
        return 431, f"a header is longer than {MAX_HEADER_BYTES} bytes"
    if isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in exc.message:
        return 431, f"more than {MAX_HEADERS} headers"
    for cls in type(exc).__mro__:
        if cls in _MALFORMED:
            return 400, _MALFORMED[cls]
    return 400, "the request is not well-formed HTTP/1.1"


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, whose own error answers are problem+json.

    aiohttp answers what its parser refuses (and a handler that failed past the
    application's middlewares) itself, as plain text that quotes the input; this
    answers the same cases with an RFC 9457 body that quotes nothing.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request that cannot be handled; the connection closes after it."""
        if isinstance(exc, http_exceptions.HttpProcessingError):
            status, detail = _parse_problem(exc, self.max_line_size)
            # Not HTTP at all (TLS on the plain port, a scanner) is the noise of the internet.
            quiet = isinstance(exc, http_exceptions.BadHttpMethod)
            (log.debug if quiet else log.warning)(
                "http_malformed_request", status=status, error=type(exc).__name__,
                peer=request.remote,
            )  # fmt: skip
        else:
            detail = "unexpected error; see the log"
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was partly sent: no error answer can follow it")
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
        response = web.Response(
            status=status,
            body=json.dumps(body, separators=(",", ":")).encode(),
            content_type="application/problem+json",
        )
        response.force_close()
        return response


class _ProblemServer(web.Server):
    """aiohttp's Server, whose connections are `ProblemRequestHandler`s."""

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner serving its application through a `_ProblemServer`."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the application's startup, then its Server
        return _ProblemServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def make_runner(app: web.Application, idle_timeout: float) -> web.AppRunner:
    """An AppRunner whose connections close after `idle_timeout` s without a complete request,
    and whose parser errors are answered as problem+json (`ProblemRequestHandler`)."""
    return _Runner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=idle_timeout,
        max_line_size=MAX_URL_BYTES,
        max_field_size=MAX_HEADER_BYTES,
        max_headers=MAX_HEADERS,
    )


class _Gate(asyncio.Protocol):
    """The first protocol of an accepted connection: hands it on to aiohttp, or closes it."""

    def __init__(self, limit: ConnectionLimit) -> None:
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._limit.admit(cast(asyncio.Transport, transport))


class ConnectionLimit:
    """At most `limit` connections open at once on the listeners of one runner.

    The check is made when the connection is made, not when it is accepted: the
    loop accepts a burst of connections before any of them is counted.
    `on_refused` runs once per refused connection (a metric's `inc`).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        limit: int,
        on_refused: Callable[[], object] = lambda: None,
        *,
        log_every: float = REFUSED_LOG_EVERY,
    ) -> None:
        if runner.server is None:
            raise RuntimeError("call runner.setup() first")
        self.server = runner.server
        self.limit = limit
        self.refused = 0
        """Connections refused so far."""
        self._on_refused = on_refused
        self._log_every = log_every
        self._unlogged = 0
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> asyncio.Protocol:
        """The protocol factory of a listener."""
        return _Gate(self)

    def open(self) -> int:
        """Connections open now.

        aiohttp lists a connection until its handler returns, and a streaming
        handler (`/files/events`) whose client went away returns only at its
        next write: the connections already lost are not counted.
        """
        connections = self.server.connections
        if len(connections) < self.limit:
            return len(connections)
        return sum(1 for handler in connections if handler.transport is not None)

    def admit(self, transport: asyncio.Transport) -> None:
        """Hand a new connection to aiohttp, or close it if `limit` are open."""
        if self.open() >= self.limit:
            transport.abort()
            self.refused += 1
            self._on_refused()
            self._note_refused()
            return
        handler = self.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)

    def _note_refused(self) -> None:
        if self._timer is not None:  # a line went out less than log_every ago
            self._unlogged += 1
            return
        self._log(1)

    def _log(self, refused: int) -> None:
        log.warning(
            "http_connections_refused",
            refused=refused,
            refused_total=self.refused,
            limit=self.limit,
        )
        self._timer = asyncio.get_running_loop().call_later(self._log_every, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._unlogged:
            refused, self._unlogged = self._unlogged, 0
            self._log(refused)

    def close(self) -> None:
        """Stop the log timer (the listeners are closed by the runner)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LimitedSite(web.BaseSite):
    """A TCP listener of a runner, as `web.TCPSite`, whose connections pass `limit` first.

    With `ssl_context` it serves TLS only; a connection is counted against `limit`
    once its handshake is done, and a handshake gets `ssl_handshake_timeout` seconds.
    """

    __slots__ = ("_handshake_timeout", "_host", "_limit", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limit: ConnectionLimit,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._limit = limit
        self._handshake_timeout = ssl_handshake_timeout

    @property
    def name(self) -> str:
        """Its URL."""
        scheme = "https" if self._ssl_context else "http"
        return str(URL.build(scheme=scheme, host=self._host, port=self._port))

    async def start(self) -> None:
        """Listen (`port` 0: any free port; the runner's `addresses` tell which)."""
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._limit,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )
