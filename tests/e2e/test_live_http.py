"""The live HTTP endpoints as an operator sees them: `curl -N .../files/events`, `/watchers`.

Real aggregator and watcher processes over a copy of sample-folders/; `curl`
is one more child of the test, its output in its log file, read as it grows.
Every wait is a bounded poll.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import HOST, Proc, ProcessTracker, http_get, wait_for

from .conftest import SYNC_TIMEOUT, Aggregator, Cluster


@dataclass(frozen=True)
class Sse:
    """One Server-Sent Event as curl printed it."""

    event: str
    id: int | None
    data: Any


def curl_events(processes: ProcessTracker, agg: Aggregator, query: str = "") -> Proc:
    """`curl -sN` on the aggregator's /files/events, as a person would run it."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = f"http://{HOST}:{agg.http_port}/files/events{query}"
    return processes.start("curl", [curl, "-sN", url])


def printed(proc: Proc) -> list[Sse]:
    """The complete events curl has printed so far (comments skipped)."""
    text = proc.log_text()
    out: list[Sse] = []
    for block in text[: text.rfind("\n\n") + 1].split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in fields:
            raw_id = fields.get("id")
            out.append(
                Sse(fields["event"], int(raw_id) if raw_id else None, json.loads(fields["data"]))
            )
    return out


def wait_printed(proc: Proc, what: str, until: Any) -> list[Sse]:
    """Poll curl's output until `until(events)` holds."""
    return wait_for(lambda: printed(proc), SYNC_TIMEOUT, until=until, what=what, interval=0.01)


def changes_of(events: list[Sse], filename: str) -> list[str]:
    """The kinds of the change events of one file, in order."""
    return [e.event for e in events if e.event != "version" and e.data["filename"] == filename]


def test_curl_shows_each_change_as_it_happens(cluster: Cluster, processes: ProcessTracker) -> None:
    agg = cluster.aggregator
    curl = curl_events(processes, agg)
    first = wait_printed(curl, "the version event", lambda e: len(e) >= 1)[0]
    start = first.id
    assert first.event == "version"
    assert start is not None
    assert first.data == {"version": start, "count": 4}
    assert agg.detail()["version"] == start

    folder = cluster.folders.folder1
    (folder / "new.txt").write_bytes(b"hello")
    wait_printed(curl, "new.txt's add", lambda e: "add" in changes_of(e, "new.txt"))
    with (folder / "cats.txt").open("ab") as fh:
        fh.write(b" and more")
    size = (folder / "cats.txt").stat().st_size
    wait_printed(
        curl,
        "cats.txt's modify with its new size",
        lambda e: any(x.event == "modify" and x.data["size"] == size for x in e[1:]),
    )
    (folder / "new.txt").unlink()
    events = wait_printed(curl, "new.txt's remove", lambda e: "remove" in changes_of(e, "new.txt"))

    # In order, each once, none missed.
    assert [e.id for e in events] == list(range(start, start + len(events)))
    for e in events[1:]:
        assert set(e.data) == {"filename", "node", "size", "modified", "version"}, e
        assert e.data["version"] == e.id
        assert e.data["node"] == cluster.watcher1.node
    listed = {(f["filename"], f["node"]) for f in agg.detail()["files"]}
    assert ("new.txt", cluster.watcher1.node) not in listed

    # A restart of the aggregator ends the stream: curl exits by itself, at once.
    agg.proc.terminate()
    assert curl.wait_exit(5) == 0


def test_curl_resumes_from_a_version_with_no_list(
    cluster: Cluster, processes: ProcessTracker
) -> None:
    agg = cluster.aggregator
    version = agg.detail()["version"]
    (cluster.folders.folder2 / "zebras.txt").write_bytes(b"z")
    wait_for(agg.try_files, SYNC_TIMEOUT, until=lambda f: f is not None and "zebras.txt" in f)
    curl = curl_events(processes, agg, f"?since={version}")
    events = wait_printed(curl, "the missed add", lambda e: "add" in changes_of(e, "zebras.txt"))
    assert events[0].event == "add"  # no version event, no list: the missed changes
    assert events[0].id == version + 1


def test_watchers_shows_each_watcher_then_a_killed_one_lost(cluster: Cluster) -> None:
    agg = cluster.aggregator

    def watchers() -> list[dict[str, Any]]:
        reply = http_get(agg.http_port, "/watchers")
        assert reply.status == 200, reply
        body: list[dict[str, Any]] = reply.json()["watchers"]
        return body

    listed = watchers()
    nodes = sorted([cluster.watcher1.node, cluster.watcher2.node])
    assert [w["name"] for w in listed] == nodes
    for w in listed:
        assert (w["protocol"], w["state"], w["files"]) == ("grpc", "connected", 2), w
        assert w["epoch"] and isinstance(w["sequence"], int) and w["last_seen"].endswith("Z")

    cluster.watcher1.proc.kill()
    lost = wait_for(
        watchers,
        SYNC_TIMEOUT,
        until=lambda ws: {w["name"]: w["state"] for w in ws}.get(cluster.watcher1.node) == "lost",
        what="the killed watcher to be lost",
    )
    assert {w["name"]: w["state"] for w in lost}[cluster.watcher2.node] == "connected"
    wait_for(
        watchers,
        agg.ttl + SYNC_TIMEOUT,
        until=lambda ws: [w["name"] for w in ws] == [cluster.watcher2.node],
        what="the killed watcher to go after the TTL",
    )
