"""`GET /watchers`: every watcher the aggregator holds, its link and its position."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from aggregator.index import Index
from aggregator.liveness import Liveness
from aggregator.names import rfc3339

PATH = "/watchers"


def watchers_body(
    index: Index, liveness: Liveness | None, now: float, offset_ns: int
) -> dict[str, list[dict[str, Any]]]:
    """The `/watchers` document, sorted by name.

    Each watcher the index holds, with its protocol, whether it is connected
    (stream open, hellos coming) or lost (within its TTL after a break), its
    files, epoch (a legacy watcher's instance) and applied sequence (seqno),
    and when it was last heard from (RFC 3339, UTC). `now` is on the clock of
    `liveness` (monotonic); `offset_ns` turns its times into wall-clock times.
    A watcher that `liveness` does not know (none is, in the running
    aggregator) shows a null protocol and last_seen, and is lost.
    """
    rows = []
    for info in sorted(index.watchers(), key=lambda w: w.node):
        presence = liveness.presence(info.node, now) if liveness is not None else None
        protocol = last_seen = None
        connected = False
        if presence is not None:
            protocol, connected = presence.protocol, presence.connected
            last_seen = rfc3339(round(presence.last_seen * 1e9) + offset_ns)
        rows.append(
            {
                "name": info.node,
                "protocol": protocol,
                "state": "connected" if connected else "lost",
                "files": info.file_count,
                "epoch": info.epoch,
                "sequence": info.applied_sequence,
                "last_seen": last_seen,
            }
        )
    return {"watchers": rows}


_RESYNC_NS = 100_000_000  # the clocks' offset moved more (0.1 s): the wall clock was set


@dataclass(slots=True)
class _Watchers:
    index: Index
    liveness: Liveness | None
    offset_ns: int = 0  # wall clock minus monotonic clock

    def clocks(self) -> tuple[float, int]:
        """The monotonic time now, and the wall clock's offset from it (ns).

        Reading both clocks gives their offset give or take the time between the
        two reads: read afresh for every request, an unchanged last_seen would
        move by microseconds. It is read again only once the wall clock was set.
        """
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        if abs(offset - self.offset_ns) > _RESYNC_NS:
            self.offset_ns = offset
        return now / 1e9, self.offset_ns


WATCHERS: web.AppKey[_Watchers] = web.AppKey("watchers", _Watchers)


async def get_watchers(request: web.Request) -> web.Response:
    """GET /watchers: the watchers, sorted by name."""
    source = request.app[WATCHERS]
    doc = watchers_body(source.index, source.liveness, *source.clocks())
    try:
        body = orjson.dumps(doc)
    except orjson.JSONEncodeError:  # a legacy instance holding a lone surrogate (\udcXX)
        body = json.dumps(doc, separators=(",", ":")).encode("ascii")
    return web.Response(
        body=body,
        content_type="application/json",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


def add_watchers_route(app: web.Application, index: Index, liveness: Liveness | None) -> None:
    """Serve `GET /watchers` on `app`: the watchers of `index`, their links from `liveness`."""
    app[WATCHERS] = _Watchers(index, liveness)
    app.router.add_get(PATH, get_watchers)
