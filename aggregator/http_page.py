"""`GET /`: the live page for a browser, a small index of links for a JSON client.

The page is three plain files in `aggregator/static/` (HTML, CSS, JavaScript:
no build step, nothing fetched from elsewhere), served from `/static/`. It
loads `/files/?detail=1`, follows `/files/events` from that version and polls
`/watchers`. Which of the two `/` answers is chosen by the Accept header: HTML
only when the client prefers `text/html` to `application/json`, so that curl
(`*/*`) and clients that send no Accept get the JSON index.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"

LINKS = {
    "files": "/files/",
    "detail": "/files/?detail=1",
    "events": "/files/events",
    "watchers": "/watchers",
    "openapi": "/openapi.json",
    "metrics": "/metrics",
    "healthz": "/healthz",
}
_INDEX_BODY = orjson.dumps({"links": LINKS})

# The page loads only its own files and talks only to its own origin.
_PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-cache",
    "Vary": "Accept",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _quality(accept: str, media_type: str) -> float:
    """The q an Accept header gives `media_type`: that of its most specific matching range."""
    kind = media_type.split("/", 1)[0]
    best_specificity, best_q = -1, 0.0
    for part in accept.split(","):
        fields = part.split(";")
        media_range = fields[0].strip().lower()
        if media_range == media_type:
            specificity = 2
        elif media_range == f"{kind}/*":
            specificity = 1
        elif media_range == "*/*":
            specificity = 0
        else:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        if specificity > best_specificity:
            best_specificity, best_q = specificity, q
    return best_q


def prefers_html(accept: str) -> bool:
    """Whether an Accept header prefers HTML to JSON (a tie, or no header, is JSON)."""
    html = _quality(accept, "text/html")
    return html > 0 and html > _quality(accept, "application/json")


async def get_root(request: web.Request) -> web.StreamResponse:
    """GET /: the live page for `Accept: text/html`, else `{"links": {...}}`."""
    if prefers_html(request.headers.get("Accept", "")):
        return web.FileResponse(INDEX_HTML, headers=_PAGE_HEADERS)
    return web.Response(
        body=_INDEX_BODY,
        content_type="application/json",
        charset="utf-8",
        headers={"Vary": "Accept", "Cache-Control": "no-cache"},
    )


async def _revalidate_static(request: web.Request, response: web.StreamResponse) -> None:
    """Static assets are revalidated on every load, so that an upgrade is seen at once."""
    if request.path.startswith("/static/") and response.status in (200, 304):
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"


_ASSETS = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}
"""The page's files by name: nothing else is served under /static/."""


async def get_asset(request: web.Request) -> web.StreamResponse:
    """GET /static/{filename}: one of the page's files; any other name is a 404 problem."""
    path = _ASSETS.get(request.match_info["filename"])
    if path is None:
        raise web.HTTPNotFound(text="the page has no file of that name")
    return web.FileResponse(path)


def add_page_routes(app: web.Application) -> None:
    """`GET /` and the page's assets under `/static/`."""
    app.router.add_get("/", get_root)
    app.router.add_get("/static/{filename}", get_asset, name="static")
    app.on_response_prepare.append(_revalidate_static)
