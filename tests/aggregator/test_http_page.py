"""`GET /` and the page's assets, over a real socket (the page itself runs in tests/e2e)."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import pytest
from aiohttp import web

from aggregator.http_gateway import make_app
from aggregator.http_page import LINKS, STATIC_DIR, prefers_html
from aggregator.index import Index
from aggregator.store import Store
from aggregator.telemetry import Metrics
from tests.support import ROOT

HOST = "127.0.0.1"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
ASSETS = ("index.html", "app.js", "style.css")


Reply = tuple[int, Mapping[str, str], bytes]


class Get(Protocol):
    """GET a path with headers: (status, headers, body)."""

    async def __call__(self, path: str, **headers: str) -> Reply: ...


@pytest.fixture
async def get() -> AsyncIterator[Get]:
    """GET a path of a served `make_app`: (status, headers, body)."""
    metrics = Metrics()
    app = make_app(Store(Index(), metrics), metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    base = f"http://{HOST}:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:

        async def fetch(path: str, **headers: str) -> Reply:
            async with session.get(base + path, headers=headers, allow_redirects=False) as resp:
                return resp.status, resp.headers, await resp.read()

        yield fetch
    await runner.cleanup()


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("text/*", True),
        ("application/json", False),
        ("*/*", False),  # curl: a tie goes to JSON
        ("", False),
        ("text/html;q=0.5, application/json", False),
        ("application/json;q=0.2, text/html;q=0.9", True),
        ("text/html;q=0", False),
        ("TEXT/HTML", True),
        ("text/html;q=bogus", False),
        ("image/png", False),
    ],
)
def test_prefers_html(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


async def test_a_browser_gets_the_page(get: Get) -> None:
    status, headers, body = await get("/", Accept=BROWSER_ACCEPT)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Vary"] == "Accept"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    text = body.decode()
    assert text.startswith("<!doctype html>")
    assert '<script src="/static/app.js" defer></script>' in text
    assert '<link rel="stylesheet" href="/static/style.css">' in text


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
async def test_a_json_client_gets_the_links(get: Get, accept: str | None) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    status, got, body = await get("/", **headers)
    assert status == 200
    assert got["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {
        "links": {
            "files": "/files/",
            "detail": "/files/?detail=1",
            "events": "/files/events",
            "watchers": "/watchers",
            "openapi": "/openapi.json",
            "metrics": "/metrics",
            "healthz": "/healthz",
        }
    }
    assert json.loads(body)["links"] == LINKS


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("app.js", ("text/javascript", "application/javascript")), ("style.css", ("text/css",))],
)
async def test_the_assets_are_served(get: Get, name: str, media_type: tuple[str, ...]) -> None:
    status, headers, body = await get(f"/static/{name}")
    assert status == 200
    assert headers["Content-Type"].split(";")[0] in media_type
    assert headers["Cache-Control"] == "no-cache"
    assert body == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "path", ["/static/../http_page.py", "/static/%2e%2e/http_page.py", "/static/nope.js"]
)
async def test_nothing_but_the_assets_is_served(get: Get, path: str) -> None:
    status, _, body = await get(path)
    assert status in (403, 404)
    assert b"add_page_routes" not in body


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """Every URL in the page's files is a path of this server (no CDN, no fonts)."""
    for name in ASSETS:
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name
        assert "@import" not in text, name


def test_the_assets_are_package_data() -> None:
    """A wheel carries them: pyproject's package-data covers every file in static/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["aggregator"]
    files = sorted(p.name for p in STATIC_DIR.iterdir())
    assert files == sorted(ASSETS)
    for name in files:
        assert any((STATIC_DIR / name).match(f"aggregator/{pattern}") for pattern in patterns), name
