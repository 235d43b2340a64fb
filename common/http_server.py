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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import structlog
from aiohttp import web
from yarl import URL

log = structlog.get_logger(__name__)

REFUSED_LOG_EVERY = 10.0
"""Seconds between two log lines about refused connections, at most."""


def make_runner(app: web.Application, idle_timeout: float) -> web.AppRunner:
    """An AppRunner whose connections close after `idle_timeout` s without a complete request."""
    return web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=idle_timeout)


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

    def admit(self, transport: asyncio.Transport) -> None:
        """Hand a new connection to aiohttp, or close it if `limit` are open."""
        if len(self.server.connections) >= self.limit:
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
    """A TCP listener of a runner, as `web.TCPSite`, whose connections pass `limit` first."""

    __slots__ = ("_host", "_limit", "_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, limit: ConnectionLimit
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._limit = limit

    @property
    def name(self) -> str:
        """Its URL."""
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        """Listen (`port` 0: any free port; the runner's `addresses` tell which)."""
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._limit, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
