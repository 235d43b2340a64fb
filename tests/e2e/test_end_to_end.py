"""The whole system, as an operator sees it: real processes, real folders, GET /files/.

Every wait is a bounded poll (`wait_for`); nothing relies on a sleep.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.support import Reply, http_get, wait_for

from .conftest import (
    SAMPLE_FILES,
    START_TIMEOUT,
    SYNC_TIMEOUT,
    Aggregator,
    AggregatorFactory,
    Cluster,
    ClusterFactory,
    WatcherFactory,
)

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


def wait_listed(agg: Aggregator, expected: list[str], timeout: float = SYNC_TIMEOUT) -> None:
    """Wait until GET /files/ lists exactly `expected`, in that order."""
    wait_for(
        agg.try_files,
        timeout,
        until=lambda files: files == expected,
        what=f"GET /files/ to list {len(expected)} files",
    )


def wait_present(agg: Aggregator, name: str, interval: float = 0.02) -> None:
    """Wait until GET /files/ lists `name`."""
    wait_for(
        agg.try_files,
        SYNC_TIMEOUT,
        until=lambda files: files is not None and name in files,
        what=f"{name} to be listed",
        interval=interval,
    )


def write(path: Path, data: bytes = b"data") -> None:
    """Create or overwrite a file in one go."""
    path.write_bytes(data)


# ---------------------------------------------------------------- 1. the read API


def test_sample_files_are_listed_sorted_in_the_documented_shape(cluster: Cluster) -> None:
    expected = {"files": [{"filename": name} for name in SAMPLE_FILES]}
    for path in ("/files/", "/files"):
        resp = cluster.aggregator.get(path)
        assert resp.status == 200, (path, resp)  # answered directly: no redirect
        assert "location" not in resp.headers
        assert resp.headers["content-type"] == "application/json; charset=utf-8"
        assert resp.json() == expected
        assert resp.body == (
            b'{"files":[{"filename":"cats.txt"},{"filename":"dogs.txt"},'
            b'{"filename":"lions.txt"},{"filename":"tigers.txt"}]}'
        )


# ---------------------------------------------------------------- 2. changes


def test_created_removed_renamed_and_modified_files_show_up(
    cluster: Cluster, lags: list[float]
) -> None:
    agg = cluster.aggregator
    f1 = cluster.folders.folder1

    # Created: each appears; the time until it is listed is the end-to-end lag.
    for i in range(5):
        name = f"new-{i}.txt"
        started = time.monotonic()
        write(f1 / name)
        wait_present(agg, name, interval=0.005)
        lags.append(time.monotonic() - started)
    names = sorted([*SAMPLE_FILES, *(f"new-{i}.txt" for i in range(5))])
    wait_listed(agg, names)

    # Removed.
    (f1 / "new-0.txt").unlink()
    names.remove("new-0.txt")
    wait_listed(agg, names)

    # Renamed: the old name goes, the new one comes.
    os.rename(f1 / "dogs.txt", f1 / "puppies.txt")
    names = sorted([*(n for n in names if n != "dogs.txt"), "puppies.txt"])
    wait_listed(agg, names)

    # Modified: the detail view shows the new size and mtime.
    cats = f1 / "cats.txt"
    with cats.open("ab") as fh:
        fh.write(b" and a much longer tail of content")
    new_size = cats.stat().st_size

    def cats_entry() -> dict[str, object] | None:
        for entry in agg.detail()["files"]:
            if entry["filename"] == "cats.txt":
                return dict(entry)
        return None

    entry = wait_for(
        cats_entry,
        SYNC_TIMEOUT,
        until=lambda e: e is not None and e["size"] == new_size,
        what="cats.txt to get its new size",
    )
    assert entry is not None
    assert entry["node"] == cluster.watcher1.node
    modified = entry["modified"]
    assert isinstance(modified, str) and RFC3339_UTC.match(modified), modified
    seen = datetime.fromisoformat(modified.replace("Z", "+00:00"))
    actual = datetime.fromtimestamp(cats.stat().st_mtime_ns / 1e9, UTC)
    assert abs((seen - actual).total_seconds()) < 0.001, (seen, actual)

    # The detail view as a whole.
    detail = agg.detail()
    assert set(detail) == {"files", "version", "count"}
    assert isinstance(detail["version"], int) and detail["version"] > 0
    assert detail["count"] == len(detail["files"]) == len(names)
    assert [e["filename"] for e in detail["files"]] == names
    nodes = {cluster.watcher1.node, cluster.watcher2.node}
    for e in detail["files"]:
        assert set(e) == {"filename", "node", "size", "modified"}, e
        assert e["node"] in nodes
        assert isinstance(e["size"], int) and e["size"] >= 0
        assert RFC3339_UTC.match(e["modified"]), e
    # The default body is still the documented shape.
    assert agg.get("/files/").json() == {"files": [{"filename": n} for n in names]}


# ---------------------------------------------------------------- 3. volume


def test_a_thousand_files_appear_and_disappear(cluster: Cluster) -> None:
    agg = cluster.aggregator
    f2 = cluster.folders.folder2
    many = [f"bulk-{i:04d}.txt" for i in range(1000)]
    for name in many:
        write(f2 / name, name.encode())
    wait_listed(agg, sorted([*SAMPLE_FILES, *many]), timeout=30)
    assert agg.detail()["count"] == 1004

    for name in many:
        (f2 / name).unlink()
    wait_listed(agg, SAMPLE_FILES, timeout=30)


# ---------------------------------------------------------------- 4. same name twice


def test_the_same_name_in_two_folders_is_listed_twice(start_cluster: ClusterFactory) -> None:
    # Named so that folder2's watcher sorts first: ties go by watcher name.
    c = start_cluster(names=("node-b", "node-a"))
    agg = c.aggregator
    write(c.folders.folder1 / "same.txt", b"one")
    write(c.folders.folder2 / "same.txt", b"two!")
    wait_listed(agg, ["cats.txt", "dogs.txt", "lions.txt", "same.txt", "same.txt", "tigers.txt"])

    def same_entries() -> list[tuple[str, int]]:
        return [
            (e["node"], e["size"]) for e in agg.detail()["files"] if e["filename"] == "same.txt"
        ]

    # Each keeps its own entry (and size), the tie broken by the watcher's name.
    wait_for(
        same_entries,
        SYNC_TIMEOUT,
        until=lambda same: same == [("node-a", 4), ("node-b", 3)],
        what="both same.txt entries with their sizes",
    )
    keys = agg.entries()
    assert keys == sorted(keys)

    # Removing one leaves the other.
    (c.folders.folder1 / "same.txt").unlink()
    wait_listed(agg, ["cats.txt", "dogs.txt", "lions.txt", "same.txt", "tigers.txt"])
    assert ("same.txt", "node-a") in agg.entries()


# ---------------------------------------------------------------- 5, 6. a watcher goes


def test_a_watcher_stopped_by_sigterm_is_removed_at_once(start_cluster: ClusterFactory) -> None:
    c = start_cluster(ttl=30)  # a TTL far longer than the wait below
    started = time.monotonic()
    assert c.watcher1.proc.terminate() == 0
    wait_listed(c.aggregator, ["lions.txt", "tigers.txt"], timeout=10)
    assert time.monotonic() - started < 10 < c.aggregator.ttl
    assert c.aggregator.proc.find_event("watcher_left", node=c.watcher1.node) is not None


def test_a_killed_watcher_keeps_its_files_until_the_ttl(cluster: Cluster) -> None:
    agg = cluster.aggregator
    assert agg.ttl == 2
    killed_at = time.monotonic()
    cluster.watcher1.proc.kill()
    # The aggregator notices the broken stream and keeps the files for the TTL.
    agg.proc.wait_event("watcher_vanished", timeout=SYNC_TIMEOUT, node=cluster.watcher1.node)
    assert agg.files() == SAMPLE_FILES
    wait_listed(agg, ["lions.txt", "tigers.txt"], timeout=agg.ttl + 8)
    assert time.monotonic() - killed_at >= agg.ttl - 0.05


# ---------------------------------------------------------------- 7, 8. restarts


def watcher_files(port: int) -> list[str]:
    """The names a watcher's own GET /files lists."""
    return sorted(f["filename"] for f in http_get(port, "/files").json()["files"])


def test_an_aggregator_restart_loses_nothing(
    cluster: Cluster, start_aggregator: AggregatorFactory
) -> None:
    old = cluster.aggregator
    f1 = cluster.folders.folder1
    old.proc.kill()

    # Changes while the aggregator is down.
    write(f1 / "while-down.txt")
    (f1 / "dogs.txt").unlink()
    wait_for(
        lambda: watcher_files(cluster.watcher1.http_port),
        SYNC_TIMEOUT,
        until=lambda files: files == ["cats.txt", "while-down.txt"],
        what="watcher 1 to see the changes made while the aggregator is down",
    )

    new = start_aggregator(ttl=old.ttl, http_port=old.http_port, grpc_port=old.grpc_port)
    wait_listed(new, ["cats.txt", "lions.txt", "tigers.txt", "while-down.txt"], START_TIMEOUT)
    for w in (cluster.watcher1, cluster.watcher2):
        assert new.proc.find_event("watcher_hello", node=w.node) is not None


def test_a_restarted_watcher_replaces_its_list_without_duplicates(
    start_cluster: ClusterFactory, start_watcher: WatcherFactory
) -> None:
    # A long TTL: the old list stays until the new instance's snapshot replaces it.
    c = start_cluster(ttl=30, names=("node-1", "node-2"))
    agg, old, f1 = c.aggregator, c.watcher1, c.folders.folder1
    old.proc.kill()
    (f1 / "dogs.txt").unlink()
    write(f1 / "after.txt")
    proc = start_watcher.spawn(f1, agg, name="node-1", port=old.http_port)

    polls = 0

    def observe() -> list[str]:
        nonlocal polls
        polls += 1
        assert proc.alive, f"the restarted watcher exited:\n{proc.log_text()}"
        entries = agg.entries()
        assert len(entries) == len(set(entries)), f"duplicate entries: {entries}"
        for kept in (("cats.txt", "node-1"), ("lions.txt", "node-2"), ("tigers.txt", "node-2")):
            assert kept in entries, f"{kept} vanished during the restart: {entries}"
        return [name for name, _ in entries]

    final = ["after.txt", "cats.txt", "lions.txt", "tigers.txt"]
    wait_for(observe, START_TIMEOUT, until=lambda names: names == final, what="the new list")
    new = start_watcher.ready(proc, f1)
    assert (new.node, new.http_port) == ("node-1", old.http_port)
    assert polls >= 1
    assert sorted(agg.entries()) == [
        ("after.txt", "node-1"),
        ("cats.txt", "node-1"),
        ("lions.txt", "node-2"),
        ("tigers.txt", "node-2"),
    ]


# ---------------------------------------------------------------- 9. HTTP caching


def test_etag_304_and_gzip(cluster: Cluster) -> None:
    agg = cluster.aggregator
    first = agg.get("/files/")
    etag = first.headers["etag"]
    again = agg.get("/files/", {"If-None-Match": etag})
    assert again.status == 304
    assert again.body == b""
    assert again.headers["etag"] == etag

    write(cluster.folders.folder1 / "changed.txt")
    changed = wait_for(
        agg.get,
        SYNC_TIMEOUT,
        until=lambda r: r.headers["etag"] != etag,
        what="the ETag to change",
    )
    assert "changed.txt" in [f["filename"] for f in changed.json()["files"]]
    stale = agg.get("/files/", {"If-None-Match": etag})
    assert stale.status == 200
    assert stale.json() == changed.json()

    # A large list is gzip-compressed for a client that accepts it.
    many = [f"file-{i:03d}-with-a-longish-name.txt" for i in range(200)]
    for name in many:
        write(cluster.folders.folder2 / name)
    wait_listed(agg, sorted([*SAMPLE_FILES, "changed.txt", *many]))

    def both() -> tuple[Reply, Reply]:
        plain = agg.get("/files/")
        zipped = agg.get("/files/", {"Accept-Encoding": "gzip"})
        return plain, zipped

    plain, zipped = wait_for(
        both,
        SYNC_TIMEOUT,
        until=lambda pair: pair[0].headers["etag"] == pair[1].headers["etag"],
        what="two reads of one version",
    )
    assert "content-encoding" not in plain.headers
    assert zipped.status == 200
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["content-type"] == "application/json; charset=utf-8"
    assert len(zipped.body) < len(plain.body)
    assert gzip.decompress(zipped.body) == plain.body
    assert json.loads(gzip.decompress(zipped.body))["files"][0] == {"filename": "cats.txt"}


# ---------------------------------------------------------------- 10. odd names


def test_odd_and_non_utf8_names_are_listed_exactly(cluster: Cluster) -> None:
    folder = cluster.folders.folder1
    raw = os.fsencode(folder) + b"/caf\xe9.txt"
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    odd = [
        "with space.txt",
        'say "hi".txt',
        "it's.txt",
        "back\\slash.txt",
        "\U0001f600 party.txt",
        ".hidden",
        "..dots",
        "x" * 251 + ".txt",  # 255 bytes, the usual limit
    ]
    for name in odd:
        write(folder / name)
    non_utf8 = os.fsdecode(b"caf\xe9.txt")
    assert non_utf8 == "caf\udce9.txt"
    expected = sorted([*SAMPLE_FILES, *odd, non_utf8])  # code point order
    wait_listed(cluster.aggregator, expected)

    resp = cluster.aggregator.get("/files/")
    assert b'"caf\\udce9.txt"' in resp.body  # the documented, lossless escape
    resp.body.decode("utf-8")  # still a valid UTF-8 document, readable in a browser
    listed = [f["filename"] for f in resp.json()["files"]]
    assert listed == expected
    assert os.fsencode(listed[listed.index(non_utf8)]) == b"caf\xe9.txt"
    on_disk = set(os.listdir(os.fsencode(folder)))
    for name in listed:
        if name not in ("lions.txt", "tigers.txt"):
            assert os.fsencode(name) in on_disk, name
