"""The watcher's own HTTP side: `GET /files` in the Go watcher's shape, `/healthz`, `/metrics`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from watcher.legacy_json import dumps, legacy_name
from watcher.state import FolderState

STATE: web.AppKey[FolderState] = web.AppKey("state", FolderState)
INSTANCE: web.AppKey[str] = web.AppKey("instance", str)
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
HEALTH: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("health")


async def get_files(request: web.Request) -> web.Response:
    """GET /files: {"instance":..., "files":[{"filename":...}], "seqno":N}."""
    state = request.app[STATE]
    # Read in one step of the loop: the list includes every change up to seqno.
    payload = {
        "instance": request.app[INSTANCE],
        "files": [{"filename": legacy_name(n)} for n in state.files],
        "seqno": state.sequence,
    }
    # Undecodable bytes as \udcXY escapes, as in our PATCHes (see watcher.legacy_json).
    return web.Response(body=dumps(payload), content_type="application/json")


async def get_healthz(request: web.Request) -> web.Response:
    """GET /healthz: alive, with the stream's state; 503 while the aggregator refuses us."""
    health = request.app[HEALTH]()
    return web.Response(
        status=200 if health["status"] == "ok" else 503,
        body=dumps(health),  # the folder's path may hold undecodable bytes too
        content_type="application/json",
    )


async def get_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(
    state: FolderState,
    instance: str,
    registry: CollectorRegistry,
    health: Callable[[], dict[str, Any]],
) -> web.Application:
    """The aiohttp application of a watcher."""
    app = web.Application()
    app[STATE] = state
    app[INSTANCE] = instance
    app[REGISTRY] = registry
    app[HEALTH] = health
    app.router.add_get("/files", get_files)
    app.router.add_get("/files/", get_files)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/metrics", get_metrics)
    return app
