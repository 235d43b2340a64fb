"""The shared HTTP idle timeout leaves a response in progress alone (a real server on loopback).

The idle timeout itself and the connection limit are tested against real
processes in tests/faults/test_http_limits.py; this is the other side of the
idle timeout: a long streaming response (as Server-Sent Events will be) outlives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from common.http_server import ConnectionLimit, LimitedSite, make_runner
from tests.support import HOST

IDLE = 0.3
CHUNKS = 8
PAUSE = 0.1  # CHUNKS * PAUSE: well past the idle timeout


async def _stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(CHUNKS):
        await resp.write(b"data: %d\n\n" % i)
        await asyncio.sleep(PAUSE)  # a slow source of events, not a wait for a condition
    await resp.write_eof()
    return resp


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/stream", _stream)
    runner = make_runner(app, IDLE)
    await runner.setup()
    limit = ConnectionLimit(runner, 10)
    await LimitedSite(runner, HOST, 0, limit).start()
    yield runner.addresses[0][1]
    await runner.cleanup()
    limit.close()


async def test_a_streaming_response_outlives_the_idle_timeout(port: int) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{HOST}:{port}/stream") as resp,
    ):
        body = await resp.read()
    assert body == b"".join(b"data: %d\n\n" % i for i in range(CHUNKS))


async def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(port: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), head
    loop = asyncio.get_running_loop()
    answered = loop.time()
    await asyncio.wait_for(reader.read(), IDLE + 2)  # the body, then the server's close
    assert reader.at_eof()
    assert loop.time() - answered >= IDLE - 0.05
    writer.close()
