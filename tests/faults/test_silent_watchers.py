"""Watchers that go silent, and file times at the edge, with real processes.

- A frozen watcher (SIGSTOP) keeps its gRPC stream open: TCP and keepalive do not
  notice it for twice the keepalive period. Its files must go once it has been
  silent for the TTL (it sends a heartbeat every --heartbeat-interval when idle),
  and come back when it wakes.
- A file dated exactly 1970-01-01T00:00:00Z has a size and a time; a legacy
  watcher's files have neither, and both readers must tell the two apart.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc

from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc
from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    WatcherFactory,
    fill,
    measured,
    wait_listed,
)
from tests.support import HOST, wait_for

KEEPALIVE = 10.0  # the default on both ends: a frozen peer is noticed after ~2x this


def test_a_frozen_watcher_goes_after_the_ttl_and_comes_back_when_it_wakes(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "w"
    fill(folder, 3)
    agg = start_aggregator(ttl=2.0)
    w = start_watcher(folder, agg.grpc_url, "--keepalive", str(KEEPALIVE), name="w")
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    w.proc.send(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        wait_for(
            lambda: agg.node_files("w"),
            KEEPALIVE,
            until=lambda names: names == [],
            what="the frozen watcher's files to go",
        )
        took = measured(
            "frozen watcher (SIGSTOP, --ttl 2) -> its files gone", time.monotonic() - frozen
        )
        # Its last heartbeat came at most 0.3 s before the freeze.
        assert took >= 2.0 - 0.3 - 0.1, took
        assert agg.proc.find_event("watcher_expired", node="w") is not None
    finally:
        w.proc.send(signal.SIGCONT)
    woke = time.monotonic()
    wait_listed(agg, "w", folder, what="the woken watcher listed again", timeout=SYNC_TIMEOUT)
    measured("woken watcher (SIGCONT) -> listed again", time.monotonic() - woke)
    assert w.proc.alive


def test_a_file_dated_the_epoch_keeps_its_time_and_a_legacy_file_has_none(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    folders = {"g": tmp_path / "g", "l": tmp_path / "l"}
    for folder in folders.values():
        folder.mkdir()
        (folder / "epoch.txt").write_bytes(b"hello")
        os.utime(folder / "epoch.txt", ns=(0, 0))
    agg = start_aggregator()
    start_watcher(folders["g"], agg.grpc_url, name="g")
    legacy = start_watcher(folders["l"], agg.http_url)
    legacy_node = f"{HOST}:{legacy.http_port}"  # a legacy watcher is named by its address
    wait_listed(agg, "g", folders["g"], what="the gRPC watcher's file", timeout=SYNC_TIMEOUT)
    wait_listed(
        agg, legacy_node, folders["l"], what="the legacy watcher's file", timeout=SYNC_TIMEOUT
    )

    by_node = {e["node"]: e for e in agg.entries()}
    assert by_node["g"] == {
        "filename": "epoch.txt",
        "node": "g",
        "size": 5,
        "modified": "1970-01-01T00:00:00.000000Z",
    }
    assert by_node[legacy_node]["size"] is None
    assert by_node[legacy_node]["modified"] is None

    with grpc.insecure_channel(agg.grpc_target) as channel:
        listed = pb_grpc.FileIndexStub(channel).ListFiles(pb.ListFilesRequest(), timeout=10)
    entries = {f.node: f for f in listed.files}
    assert entries["g"].modified == "1970-01-01T00:00:00.000000Z"
    assert entries["g"].size == 5
    assert entries[legacy_node].modified == ""  # unknown, not 1970


def test_a_new_time_set_on_a_file_shows_without_a_rescan(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    """`touch -d` changes only the inode's attributes (IN_ATTRIB), not the content."""
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "dated.txt").write_bytes(b"x")
    agg = start_aggregator()
    start_watcher(folder, agg.grpc_url, "--rescan-interval", "0", name="t")
    wait_listed(agg, "t", folder, what="the file listed", timeout=SYNC_TIMEOUT)
    os.utime(folder / "dated.txt", ns=(0, 1_000_000_000_000_000_000))  # 2001-09-09
    wait_for(
        lambda: [e["modified"] for e in agg.entries() if e["node"] == "t"],
        SYNC_TIMEOUT,
        until=lambda times: times == ["2001-09-09T01:46:40.000000Z"],
        what="the new time listed",
    )
