"""HTTP edges of the aggregator as a new user meets them, over real sockets.

A wrong method is a 405 problem with `Allow`; `?detail=` takes 0, 1, true or
false and nothing else; HEAD answers wherever GET does, with GET's status and
headers and no body; a request the parser refuses is a problem, not an echo.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from aggregator.app import Aggregator
from aggregator.http_openapi import load_document
from aggregator.index import pack_meta
from tests.aggregator.grpc_support import BASE_CONFIG
from tests.support import HOST

DOCUMENT: dict[str, Any] = json.loads(load_document())
EXAMPLE_PATHS = {"/static/{filename}": "/static/index.html"}
"""A concrete path for each documented path with a parameter."""


@pytest.fixture
async def base() -> AsyncIterator[str]:
    """The HTTP base URL of a started aggregator (with a file listed)."""
    aggregator = Aggregator(BASE_CONFIG)
    await aggregator.start()
    store = aggregator.store
    store.index.begin_snapshot("node-a", "e1")
    store.index.extend_snapshot("node-a", [(b"cats.txt", pack_meta(1, 1_700_000_000_000_000_000))])
    store.commit_snapshot("node-a", 0, "test")
    try:
        yield f"http://{HOST}:{aggregator.http_ports[0]}"
    finally:
        await aggregator.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/files/", {"GET", "HEAD", "PATCH"}),
        ("POST", "/files", {"GET", "HEAD", "PATCH"}),
        ("GET", "/hello", {"POST"}),
        ("PUT", "/bye/", {"POST"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("DELETE", "/metrics", {"GET", "HEAD"}),
        ("PATCH", "/openapi.json", {"GET", "HEAD"}),
    ],
)
async def test_a_wrong_method_is_a_405_problem_with_allow(
    base: str, session: aiohttp.ClientSession, method: str, path: str, allowed: set[str]
) -> None:
    async with session.request(method, base + path) as response:
        assert response.status == 405
        assert response.content_type == "application/problem+json"
        assert set(response.headers["Allow"].split(",")) == allowed
        problem = json.loads(await response.read())
    assert problem["status"] == 405
    assert problem["instance"] == path
    assert method in problem["detail"]


async def test_detail_takes_0_1_true_false_and_nothing_else(
    base: str, session: aiohttp.ClientSession
) -> None:
    for value, detailed in (("1", True), ("true", True), ("0", False), ("false", False)):
        async with session.get(base + "/files", params={"detail": value}) as response:
            assert response.status == 200, value
            body = await response.read()
        if detailed:
            assert set(json.loads(body)) == {"files", "version", "count"}, value
        else:
            assert body == b'{"files":[{"filename":"cats.txt"}]}', value
    for value in ("abc", "yes", "on", "", "2", "TRUE", "1 "):
        async with session.get(base + "/files/", params={"detail": value}) as response:
            assert response.status == 400, value
            assert response.content_type == "application/problem+json"
            problem = json.loads(await response.read())
        assert problem["status"] == 400
        assert "'detail' must be 0, 1, true or false" in problem["detail"]


def _documented_gets() -> list[str]:
    paths = [p for p, item in DOCUMENT["paths"].items() if "get" in item]
    return [EXAMPLE_PATHS.get(p, p) for p in paths]


async def test_head_answers_wherever_get_does_without_a_body(
    base: str, session: aiohttp.ClientSession
) -> None:
    for path in _documented_gets():
        async with session.head(base + path) as head:
            assert await head.read() == b"", path
        if path.startswith("/files/events"):  # an endless stream: its GET is not read to the end
            assert head.status == 200
            assert head.content_type == "text/event-stream"
            continue
        async with session.get(base + path) as get:
            await get.read()
        assert head.status == get.status == 200, path
        assert head.content_type == get.content_type, path
        if path != "/metrics":  # whose counters move between the two requests
            length = get.headers.get("Content-Length")
            assert head.headers.get("Content-Length") == length, path


async def test_a_url_over_the_limit_is_a_414_problem_without_the_url(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /files/?q=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"414"
    assert b"content-type: application/problem+json" in head.lower()
    assert b"xxx" not in body
    assert json.loads(body)["status"] == 414


async def test_a_file_the_page_does_not_have_is_a_404_problem(
    base: str, session: aiohttp.ClientSession
) -> None:
    for name in ("nope.js", "index.htm", "..%2fhttp_page.py"):
        async with session.get(f"{base}/static/{name}") as response:
            assert response.status == 404, name
            assert response.content_type == "application/problem+json", name
            problem = json.loads(await response.read())
        assert problem["status"] == 404
