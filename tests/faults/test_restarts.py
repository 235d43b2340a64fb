"""Processes killed and restarted: SIGKILL the aggregator, SIGKILL a watcher.

Real processes, real folders; the truth is always the folders themselves.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    Churn,
    Processes,
    WatcherFactory,
    fill,
    folder_names,
    measured,
    restart_aggregator_in,
)
from tests.support import wait_for

RECONNECT_MAX = 0.5
"""The watchers' --reconnect-max (see WATCHER_DEFAULTS)."""
HELLO_INTERVAL = 0.5
"""The legacy watchers' --hello-interval (see WATCHER_DEFAULTS)."""
SLACK = 3.0
"""Process scheduling, a snapshot and a fetch on a loaded 2-CPU machine."""


def _duplicates(entries: list[dict[str, object]]) -> list[tuple[object, object]]:
    counts = Counter((e["filename"], e["node"]) for e in entries)
    return [key for key, n in counts.items() if n > 1]


@pytest.mark.timeout(60)
def test_aggregator_killed_mid_churn_has_every_list_back_within_one_reconnect(
    procs: Processes,
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    tmp_path: Path,
) -> None:
    """SIGKILL the aggregator while both kinds of watcher churn; restart it on its ports.

    gRPC: complete within one reconnect; legacy: within one hello period.
    """
    grpc_dir, legacy_dir = tmp_path / "grpc", tmp_path / "legacy"
    fill(grpc_dir, 100, "g")
    fill(legacy_dir, 100, "l")
    agg = start_aggregator(ttl=10.0)
    grpc_w = start_watcher(grpc_dir, agg.grpc_url, name="grpc-w")
    legacy_w = start_watcher(legacy_dir, agg.http_url)
    wait_for(
        agg.try_files,
        SYNC_TIMEOUT,
        until=lambda files: files == folder_names(grpc_dir, legacy_dir),
        what="both folders listed",
    )

    churn = Churn(grpc_dir, legacy_dir, seed=1).start()
    try:
        wait_for(lambda: churn.ops, 5, until=lambda n: n >= 100, what="churn to start")
        agg.proc.kill()
        before = churn.ops
        wait_for(lambda: churn.ops, 5, until=lambda n: n >= before + 100, what="churn while down")
        agg = restart_aggregator_in(procs, agg)
        restarted = time.monotonic()
    finally:
        churn.stop()
    truth_grpc, truth_legacy = folder_names(grpc_dir), folder_names(legacy_dir)

    wait_for(
        lambda: agg.try_node_files("grpc-w"),
        RECONNECT_MAX + SLACK,
        until=lambda files: files == truth_grpc,
        what="the gRPC watcher's list back, complete",
    )
    measured("aggregator SIGKILL+restart: gRPC list complete", time.monotonic() - restarted)
    legacy_node = f"127.0.0.1:{legacy_w.http_port}"
    wait_for(
        lambda: agg.try_node_files(legacy_node),
        HELLO_INTERVAL + SLACK,
        until=lambda files: files == truth_legacy,
        what="the legacy watcher's list back, complete",
    )
    measured("aggregator SIGKILL+restart: legacy list complete", time.monotonic() - restarted)
    assert agg.files() == folder_names(grpc_dir, legacy_dir)
    assert agg.proc.events("watcher_hello", node="grpc-w", resume=False), "a full snapshot"

    # Both are live again: a new change shows up promptly.
    (grpc_dir / "after.txt").write_text("a")
    (legacy_dir / "after-legacy.txt").write_text("a")
    wait_for(
        agg.try_files,
        SYNC_TIMEOUT,
        until=lambda files: files == folder_names(grpc_dir, legacy_dir),
        what="changes after the restart",
    )
    assert grpc_w.proc.alive and legacy_w.proc.alive


@pytest.mark.timeout(60)
def test_killed_watcher_files_go_after_the_ttl_and_come_back_without_duplicates(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    """SIGKILL a watcher: its files go after the TTL (not before); restart: back, no duplicates.

    A second watcher holding the same names keeps its entries throughout.
    """
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    names = fill(a_dir, 50)
    fill(b_dir, 50)  # the same names in another folder
    agg = start_aggregator(ttl=2.0)
    wa = start_watcher(a_dir, agg.grpc_url, name="wa")
    start_watcher(b_dir, agg.grpc_url, name="wb")
    wait_for(
        agg.try_files,
        SYNC_TIMEOUT,
        until=lambda files: files == sorted(names + names),
        what="both folders listed",
    )

    killed = time.monotonic()
    wa.proc.kill()
    agg.proc.wait_event("watcher_vanished", node="wa")
    wait_for(
        lambda: agg.node_files("wa"),
        agg.ttl + SLACK,
        until=lambda files: files == [],
        what="the killed watcher's files to go",
    )
    gone_after = measured("watcher SIGKILL -> its files gone (ttl 2 s)", time.monotonic() - killed)
    assert gone_after >= agg.ttl - 0.1, f"files went after {gone_after:.2f} s, before the TTL"
    assert agg.node_files("wb") == names, "the other watcher's same-named files must stay"
    assert agg.proc.events("watcher_expired", node="wa")

    restarted = time.monotonic()
    start_watcher(a_dir, agg.grpc_url, name="wa")
    seen: list[list[dict[str, object]]] = []

    def probe() -> list[str]:
        entries = agg.entries()
        seen.append(entries)
        return [e["filename"] for e in entries if e["node"] == "wa"]

    wait_for(probe, SYNC_TIMEOUT, until=lambda files: files == names, what="files back")
    measured("watcher restart (after TTL) -> list back", time.monotonic() - restarted)
    for entries in seen:
        assert not _duplicates(entries), _duplicates(entries)


@pytest.mark.parametrize("protocol", ["grpc", "legacy"])
@pytest.mark.timeout(60)
def test_watcher_restarted_within_the_ttl_swaps_its_list_atomically(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    tmp_path: Path,
    protocol: str,
) -> None:
    """SIGKILL a watcher, change its folder, restart it before the TTL.

    Every list served meanwhile shows either the old list or the new one:
    never both (duplicates), never a file gone that is in both (flapping).
    """
    folder = tmp_path / "w"
    fill(folder, 60)
    agg = start_aggregator(ttl=30.0)
    url = agg.grpc_url if protocol == "grpc" else agg.http_url
    w = start_watcher(folder, url, name="w" if protocol == "grpc" else "")
    node = "w" if protocol == "grpc" else f"127.0.0.1:{w.http_port}"
    old = folder_names(folder)
    wait_for(lambda: agg.node_files(node), SYNC_TIMEOUT, until=lambda f: f == old, what="listed")

    w.proc.kill()
    for name in old[:20]:
        os.unlink(folder / name)
    fill(folder, 10, "new")
    new = folder_names(folder)

    seen: list[list[dict[str, object]]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.append(agg.entries())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        restarted = time.monotonic()
        # Legacy: the same port, as an operator's restart would use (a new instance).
        start_watcher(folder, url, name="w" if protocol == "grpc" else "", port=w.http_port)
        wait_for(
            lambda: agg.node_files(node), SYNC_TIMEOUT, until=lambda f: f == new, what="new list"
        )
        measured(f"{protocol} watcher restart within TTL -> new list", time.monotonic() - restarted)
    finally:
        stop.set()
        poller.join(5)
    assert seen
    for entries in seen:
        assert not _duplicates(entries), _duplicates(entries)
        listed = sorted(str(e["filename"]) for e in entries if e["node"] == node)
        assert listed in (old, new), f"an in-between list: {listed}"
