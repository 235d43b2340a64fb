"""`GET /openapi.json`: the OpenAPI 3.1 document of every HTTP endpoint.

The document is a static file of the package (`aggregator/openapi.json`),
read and checked once when the application is built, then served as is.
A test holds it to the routes the application registers, both ways.
"""

from __future__ import annotations

import functools
from importlib import resources

import orjson
from aiohttp import web

OPENAPI_PATH = "/openapi.json"
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi", bytes)


@functools.cache
def load_document() -> bytes:
    """The document's bytes, checked to be a JSON object of OpenAPI 3.1."""
    raw = resources.files("aggregator").joinpath("openapi.json").read_bytes()
    document = orjson.loads(raw)
    if not isinstance(document, dict) or not str(document.get("openapi", "")).startswith("3.1"):
        raise ValueError("aggregator/openapi.json is not an OpenAPI 3.1 document")
    return raw


async def get_openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the document."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def add_openapi_route(app: web.Application) -> None:
    """Mount `GET /openapi.json` (and its HEAD), the document loaded now."""
    app[OPENAPI] = load_document()
    app.router.add_get(OPENAPI_PATH, get_openapi)
