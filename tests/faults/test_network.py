"""The network between a watcher and the aggregator breaks.

Every watcher here reaches the aggregator through a `TcpProxy` that the test
cuts (connections reset, new ones refused), stalls (a half-open link: open,
silent) or slows down. Files are created, renamed and deleted on both sides of
each fault; after it heals, the list must equal the folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SYNC_TIMEOUT,
    Aggregator,
    AggregatorFactory,
    TcpProxy,
    Watcher,
    WatcherFactory,
    fill,
    measured,
    wait_listed,
)
from tests.support import wait_for

RECONNECT_MAX = 0.5
"""The watchers' --reconnect-max (WATCHER_DEFAULTS)."""
KEEPALIVE = 1.0
"""gRPC keepalive of both ends in these tests (watcher --keepalive, aggregator --keepalive)."""
SLACK = 3.0
"""Scheduling, a snapshot or a fetch, on a loaded 2-CPU machine."""
OUTAGE = 10.0
"""Length of the long gRPC cut. gRPC's own reconnect backoff (1 s, x1.6, +-20 %), if left
uncapped, is between attempts 4 and 10 s apart by then."""
HEAL_SLACK = 1.5
"""Beyond the capped retry delay (jittered, and the watcher's own): scheduling and a snapshot."""


def _edit(folder: Path, tag: str) -> None:
    """Create, rename and delete files: every kind of change, named after `tag`."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("f"))
    for i in range(5):
        (folder / f"{tag}-new-{i}.txt").write_text(tag)
    os.rename(folder / names[0], folder / f"{tag}-renamed.txt")
    os.unlink(folder / names[1])
    (folder / names[2]).write_text(f"modified at {tag}")


def _setup(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    proxies: Callable[[int], TcpProxy],
    folder: Path,
    *,
    ttl: float,
    protocol: str = "grpc",
) -> tuple[Aggregator, TcpProxy, Watcher, str]:
    fill(folder, 30)
    agg = start_aggregator("--keepalive", str(KEEPALIVE), ttl=ttl)
    if protocol == "grpc":
        proxy = proxies(agg.grpc_port)
        w = start_watcher(folder, f"grpc://127.0.0.1:{proxy.port}", name="w")
        node = "w"
    else:
        proxy = proxies(agg.http_port)
        w = start_watcher(folder, f"http://127.0.0.1:{proxy.port}")
        node = f"127.0.0.1:{w.http_port}"
    _edit(folder, "before")
    wait_listed(agg, node, folder, what="the folder listed before the fault", timeout=SYNC_TIMEOUT)
    return agg, proxy, w, node


@pytest.mark.timeout(60)
def test_a_cut_shorter_than_the_ttl_resumes_from_the_sequence_without_a_snapshot(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    proxies: Callable[[int], TcpProxy],
    tmp_path: Path,
) -> None:
    folder = tmp_path / "w"
    agg, proxy, w, node = _setup(start_aggregator, start_watcher, proxies, folder, ttl=8.0)
    listed_before = agg.node_files(node)
    failed = w.proc.count("stream_failed") + w.proc.count("stream_ended")

    proxy.cut()
    agg.proc.wait_event("watcher_vanished", node=node, timeout=SLACK)
    _edit(folder, "during")
    wait_for(
        lambda: w.proc.count("stream_failed") + w.proc.count("stream_ended"),
        SLACK,
        until=lambda n: n > failed,
        what="the watcher to notice the cut",
    )
    time.sleep(1.0)  # the cut lasts a while (well under the TTL); nothing is polled for here
    assert agg.node_files(node) == listed_before, "within the TTL the old list stays (no flap)"

    proxy.forward()
    took = wait_listed(
        agg, node, folder, what="the list after the cut", timeout=RECONNECT_MAX + SLACK
    )
    measured("cut < TTL (gRPC): healed -> list equals folder", took)
    _edit(folder, "after")
    wait_listed(agg, node, folder, what="changes after the cut", timeout=SYNC_TIMEOUT)

    hellos = agg.proc.events("watcher_hello", node=node)
    assert len(hellos) >= 2 and hellos[-1]["resume"] is True, hellos
    assert agg.proc.count("snapshot_installed", node=node) == 1, "no second snapshot"
    assert w.proc.events("stream_resumed"), "the watcher resumed from its sequence"
    assert w.proc.count("snapshot_sent") == 1
    assert agg.metric("filewatch_resyncs_total") == 0


@pytest.mark.parametrize("protocol", ["grpc", "legacy"])
@pytest.mark.timeout(60)
def test_a_cut_longer_than_the_ttl_ends_with_the_folder_listed(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    proxies: Callable[[int], TcpProxy],
    tmp_path: Path,
    protocol: str,
) -> None:
    """Beyond the TTL the files go; after the heal a full snapshot (or fetch) brings them back.

    While the link is down the watcher keeps trying, at least about every
    --reconnect-max seconds: a long outage must not stretch its retry delay.
    """
    folder = tmp_path / "w"
    agg, proxy, _, node = _setup(
        start_aggregator, start_watcher, proxies, folder, ttl=1.5, protocol=protocol
    )

    cut_at = time.monotonic()
    proxy.cut()
    _edit(folder, "during")
    agg.proc.wait_event("watcher_expired", node=node, timeout=agg.ttl + SLACK + 5)
    assert agg.node_files(node) == []
    _edit(folder, "during-late")
    # The outage goes on (its length is the fault; nothing is polled for here).
    outage = OUTAGE if protocol == "grpc" else 0.0
    time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))
    healed = time.monotonic()
    proxy.forward()
    took = wait_listed(
        agg, node, folder, what="the list after the long cut", timeout=SYNC_TIMEOUT + 10
    )
    measured(f"cut > TTL ({protocol}): healed -> list equals folder", took)
    if protocol == "grpc":
        # One reconnect: the retry delay is capped by --reconnect-max even after a long
        # outage (an uncapped exponential backoff would be waiting 4 to 10 s by now).
        assert took <= 0.5 + RECONNECT_MAX + HEAL_SLACK, (
            f"{took:.1f} s to reconnect after a {healed - cut_at:.0f} s outage: the retry "
            "delay is not capped by --reconnect-max"
        )
    _edit(folder, "after")
    wait_listed(agg, node, folder, what="changes after the cut", timeout=SYNC_TIMEOUT)
    if protocol == "grpc":
        assert agg.proc.events("watcher_hello", node=node)[-1]["resume"] is False
        assert agg.proc.count("snapshot_installed", node=node) == 2


@pytest.mark.timeout(60)
def test_a_half_open_link_is_detected_on_both_sides_within_the_keepalive_bound(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    proxies: Callable[[int], TcpProxy],
    tmp_path: Path,
) -> None:
    """The proxy stops forwarding without closing: keepalive notices on both ends.

    Bound: keepalive interval + keepalive timeout (2 x --keepalive) plus slack.
    """
    folder = tmp_path / "w"
    agg, proxy, w, node = _setup(start_aggregator, start_watcher, proxies, folder, ttl=30.0)
    failed = w.proc.count("stream_failed") + w.proc.count("stream_ended")
    vanished = agg.proc.count("watcher_vanished", node=node)

    stalled = time.monotonic()
    proxy.stall()
    _edit(folder, "during")
    bound = 2 * KEEPALIVE + SLACK
    agg.proc.wait_event("watcher_vanished", node=node, after=vanished, timeout=bound)
    aggregator_side = measured(
        "half-open link: aggregator noticed (keepalive 1 s)", time.monotonic() - stalled
    )
    wait_for(
        lambda: w.proc.count("stream_failed") + w.proc.count("stream_ended"),
        bound,
        until=lambda n: n > failed,
        what="the watcher to notice the half-open link",
    )
    watcher_side = measured(
        "half-open link: watcher noticed (keepalive 1 s)", time.monotonic() - stalled
    )
    assert max(aggregator_side, watcher_side) <= bound
    assert agg.node_files(node) != [], "a stall within the TTL keeps the files"

    proxy.forward()
    took = wait_listed(
        agg, node, folder, what="the list after the stall", timeout=SYNC_TIMEOUT + SLACK
    )
    measured("half-open link healed -> list equals folder", took)


@pytest.mark.timeout(60)
def test_a_slow_link_delivers_everything_without_reconnecting(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    proxies: Callable[[int], TcpProxy],
    tmp_path: Path,
) -> None:
    """200 ms each way: slower, but no reconnect, no vanish, no resync."""
    folder = tmp_path / "w"
    agg, proxy, w, node = _setup(start_aggregator, start_watcher, proxies, folder, ttl=30.0)
    failed = w.proc.count("stream_failed") + w.proc.count("stream_ended")
    proxy.delay(0.2)
    for tag in ("slow-1", "slow-2", "slow-3"):
        _edit(folder, tag)
        took = wait_listed(
            agg, node, folder, what=f"changes over the slow link ({tag})", timeout=SYNC_TIMEOUT
        )
    measured("200 ms latency each way: change -> listed", took)
    time.sleep(3 * KEEPALIVE)  # keepalive pings cross the slow link; nothing polled
    assert w.proc.count("stream_failed") + w.proc.count("stream_ended") == failed
    assert agg.proc.count("watcher_vanished", node=node) == 0
    assert agg.metric("filewatch_resyncs_total") == 0
