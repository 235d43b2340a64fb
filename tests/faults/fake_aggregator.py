"""A legacy aggregator played by the test: a real aiohttp server on its own loop in a thread.

It records every request as it came (method, path, raw body) and answers 200,
except `POST /hello` while `refuse_hello(status, detail)` is in force, so that a
blocking test can drive a real `python -m watcher -aggregator=http://...` and
read exactly what it sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support import HOST


@dataclass(frozen=True)
class Request:
    """One request the fake aggregator received."""

    method: str
    path: str
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (lone surrogates allowed, as \\udcXY escapes give them)."""
        return json.loads(self.body)


class FakeLegacyAggregator:
    """Answers the legacy protocol's hello, bye and PATCH /files; records everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._hello_refusal: tuple[int, str] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-agg", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Its base URL, for a watcher's -aggregator flag."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> FakeLegacyAggregator:
        """Listen on a free loopback port."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def close(self) -> None:
        """Stop listening and end the thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def refuse_hello(self, status: int, detail: str) -> None:
        """Answer every hello from now on with `status` and {"detail": detail}."""
        with self._lock:
            self._hello_refusal = (status, detail)

    def accept_hello(self) -> None:
        """Answer hellos 200 again."""
        with self._lock:
            self._hello_refusal = None

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """What it received so far, in order (optionally one method and path)."""
        with self._lock:
            return [
                r
                for r in self._requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    def patched_ops(self) -> list[dict[str, Any]]:
        """Every operation of every PATCH /files, in order."""
        return [op for r in self.requests("PATCH", "/files") for op in r.json()]

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self._requests.append(Request(request.method, request.path, body))
            refusal = self._hello_refusal
        if refusal is not None and (request.method, request.path) == ("POST", "/hello"):
            status, detail = refusal
            return web.json_response({"detail": detail}, status=status)
        return web.Response(status=200)


@contextmanager
def fake_legacy_aggregator() -> Iterator[FakeLegacyAggregator]:
    """A started fake aggregator, closed at the end."""
    fake = FakeLegacyAggregator().start()
    try:
        yield fake
    finally:
        fake.close()
