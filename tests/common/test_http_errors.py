"""What aiohttp's parser refuses is answered as problem+json that quotes none of the input.

A real server built by `make_runner` (the aggregator's and the watcher's) on
loopback, fed raw bytes: a URL or a header over the limit, too many headers, a
malformed request. Each gets its own status and a problem body without a byte of
what was sent, and the connection closes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from common.http_server import MAX_HEADER_BYTES, MAX_HEADERS, MAX_URL_BYTES, make_runner
from tests.support import HOST

MARKER = b"Q7zMarker"


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/", _ok)
    runner = make_runner(app, 5.0)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; (status, headers, body) of the answer, read to the server's close."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # to EOF: the server closes after an error
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _filler(size: int) -> bytes:
    return (MARKER * (size // len(MARKER) + 1))[:size]


CASES = [
    pytest.param(
        b"GET /?q=" + _filler(MAX_URL_BYTES) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="url"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + _filler(MAX_HEADER_BYTES + 1) + b"\r\n\r\n",
        431,
        id="header-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n" + _filler(MAX_HEADER_BYTES + 1) + b": 1\r\n\r\n",
        431,
        id="header-name",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%b-%d: 1\r\n" % (MARKER, i) for i in range(MAX_HEADERS + 1))
        + b"\r\n",
        431,
        id="too-many-headers",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + MARKER + b"\r\n\r\n",
        400,
        id="bad-content-length",
    ),
    pytest.param(b"G\x01T /" + MARKER + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="bad-method"),
    pytest.param(b"GET /" + MARKER + b" HTTP/9\r\nHost: x\r\n\r\n", 400, id="bad-version"),
]


@pytest.mark.parametrize(("request_bytes", "status"), CASES)
async def test_a_refused_request_is_a_problem_that_does_not_echo_it(
    port: int, request_bytes: bytes, status: int
) -> None:
    got, headers, body = await _exchange(port, request_bytes)
    assert got == status, body
    assert headers["content-type"].startswith("application/problem+json")
    assert MARKER not in body and MARKER.lower() not in body.lower()
    problem = json.loads(body)
    assert problem["status"] == status
    assert problem["title"] and problem["type"] == "about:blank"
    assert isinstance(problem["detail"], str) and problem["detail"]


async def test_requests_within_the_limits_are_served(port: int) -> None:
    url = b"/?q=" + _filler(MAX_URL_BYTES - 4)
    assert len(url) == MAX_URL_BYTES
    status, _, body = await _exchange(
        port,
        b"GET " + url + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + b"X-Big: " + _filler(MAX_HEADER_BYTES) + b"\r\n"
        + _filler(MAX_HEADER_BYTES // 2) + b": 1\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS - 4))
        + b"\r\n",
    )  # fmt: skip
    assert (status, body) == (200, b"ok")
