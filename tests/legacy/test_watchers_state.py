"""`GET /watchers` with a legacy and a streaming watcher side by side, real processes.

Our Python watcher in http:// mode (the legacy protocol: hellos every
HELLO_PERIOD) and in grpc:// mode; both are SIGKILLed, shown as lost while their
files wait for the TTL, and gone after it.
"""

from __future__ import annotations

from typing import Any

from tests.legacy.conftest import (
    HELLO_PERIOD,
    SYNC_TIMEOUT,
    TTL,
    AggregatorFactory,
    Folders,
    WatcherFactory,
)
from tests.support import HOST, http_request, wait_for


def test_watchers_shows_protocol_state_position_and_a_kill(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, folders: Folders
) -> None:
    agg = start_aggregator()
    legacy = start_watcher(folders.folder1, f"http://{HOST}:{agg.http_port}")
    grpc = start_watcher(folders.folder2, agg.grpc_url)

    def watchers() -> dict[str, dict[str, Any]]:
        reply = http_request(agg.http_port, "GET", "/watchers")
        assert reply.status == 200, reply
        assert reply.headers["content-type"] == "application/json; charset=utf-8"
        listed: list[dict[str, Any]] = reply.json()["watchers"]
        assert [w["name"] for w in listed] == sorted(w["name"] for w in listed)
        return {w["protocol"]: w for w in listed}

    both = wait_for(
        watchers,
        SYNC_TIMEOUT,
        until=lambda ws: {p: w["files"] for p, w in ws.items()} == {"legacy": 2, "grpc": 2},
        what="both watchers to be listed with their files",
    )
    assert both["legacy"]["name"] == legacy.node
    assert both["legacy"]["epoch"] == legacy.instance  # the Go protocol's instance uuid
    assert both["legacy"]["sequence"] >= 0  # its seqno
    assert both["grpc"]["epoch"] == grpc.instance
    assert all(w["state"] == "connected" and w["last_seen"].endswith("Z") for w in both.values())

    # Still connected a few hello periods on: the hellos keep it so.
    later = wait_for(
        watchers,
        HELLO_PERIOD * 2 + SYNC_TIMEOUT,
        until=lambda ws: ws["legacy"]["last_seen"] > both["legacy"]["last_seen"],
        what="a later hello to move the legacy watcher's last_seen",
    )
    assert later["legacy"]["state"] == "connected"

    legacy.proc.kill()
    grpc.proc.kill()
    lost = wait_for(
        watchers,
        HELLO_PERIOD * 2 + SYNC_TIMEOUT,
        until=lambda ws: [w["state"] for w in ws.values()] == ["lost", "lost"],
        what="both killed watchers to be lost",
    )
    assert {p: w["files"] for p, w in lost.items()} == {"legacy": 2, "grpc": 2}
    wait_for(watchers, TTL + SYNC_TIMEOUT, until=lambda ws: ws == {}, what="both to go")
