"""Replicas: three watchers each feed two aggregators (`-aggregator grpc://a,grpc://b`).

Real processes, real folders. The watchers hold the truth, so a replica that is
killed, restarted or frozen rebuilds itself from them, and the other replica
never notices.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SYNC_TIMEOUT,
    Aggregator,
    AggregatorFactory,
    Churn,
    Processes,
    Watcher,
    WatcherFactory,
    fill,
    folder_names,
    measured,
    restart_aggregator_in,
)
from tests.support import wait_for

RECONNECT_MAX = 0.5
"""The watchers' --reconnect-max (see WATCHER_DEFAULTS)."""
SLACK = 3.0
"""Process scheduling and a snapshot on a loaded 2-CPU machine."""
FOLLOW = 5.0
"""Bound on "the live replica lists the folders once the churn pauses"."""


def listing(agg: Aggregator) -> list[tuple[str, str, int]] | None:
    """(filename, node, size) of every entry, or None while it cannot be reached."""
    try:
        return [(e["filename"], e["node"], e["size"]) for e in agg.entries()]
    except OSError:
        return None


def names(agg: Aggregator) -> list[str] | None:
    """The filenames it lists, or None while it cannot be reached."""
    entries = listing(agg)
    return None if entries is None else [name for name, _, _ in entries]


def churn_then_check(churn: Churn, agg: Aggregator, folders: list[Path], what: str) -> None:
    """Churn a little, pause, and wait until `agg` lists exactly the folders."""
    churn.run_for(0.5)
    wait_for(lambda: names(agg), FOLLOW, until=lambda n: n == folder_names(*folders), what=what)


@pytest.fixture
def cluster(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> tuple[list[Aggregator], list[Watcher], list[Path]]:
    """Two aggregators; three watchers (100 files each) feeding both; both list everything."""
    replicas = [start_aggregator(ttl=10.0), start_aggregator(ttl=10.0)]
    targets = ",".join(a.grpc_url for a in replicas)
    folders = [tmp_path / f"folder{i}" for i in range(3)]
    watchers = []
    for i, folder in enumerate(folders):
        fill(folder, 100, f"w{i}-")
        # A small resend ring: a frozen replica falls behind the whole of it.
        watchers.append(start_watcher(folder, targets, "--resend-buffer", "8", name=f"w{i}"))
    for agg in replicas:
        wait_for(
            partial(names, agg),
            SYNC_TIMEOUT,
            until=lambda n: n == folder_names(*folders),
            what="both replicas to list the three folders",
        )
    return replicas, watchers, folders


@pytest.mark.timeout(90)
def test_a_replica_killed_mid_churn_goes_unnoticed_by_the_other_and_converges_on_restart(
    procs: Processes, cluster: tuple[list[Aggregator], list[Watcher], list[Path]]
) -> None:
    (a, b), watchers, folders = cluster
    churn = Churn(*folders, seed=7)
    churn_then_check(churn, a, folders, "a to follow the churn")

    b.proc.kill()  # SIGKILL, mid-churn
    killed = time.monotonic()
    churn.run_for(0.3)
    for round_ in range(3):
        churn_then_check(churn, a, folders, f"a to follow the churn with b dead ({round_})")
    assert a.proc.find_event("watcher_left") is None, "a dropped a watcher when b died"
    assert all(w.healthz()["status"] == "ok" for w in watchers)
    measured("replica b dead, a followed 3 rounds of churn", time.monotonic() - killed)

    b = restart_aggregator_in(procs, b)
    restarted = time.monotonic()
    wait_for(
        lambda: names(b),
        RECONNECT_MAX + SLACK,
        until=lambda n: n == folder_names(*folders),
        what="the restarted b to converge within one reconnect",
    )
    measured("restarted replica complete", time.monotonic() - restarted)
    churn_then_check(churn, b, folders, "b to follow the churn after its restart")
    wait_for(
        lambda: (listing(a), listing(b)),
        FOLLOW,
        until=lambda pair: pair[0] is not None and pair[0] == pair[1],
        what="both replicas to list the same entries (name, node, size)",
    )


@pytest.mark.timeout(90)
def test_a_frozen_replica_holds_back_no_one_and_gets_a_snapshot_past_the_ring(
    cluster: tuple[list[Aggregator], list[Watcher], list[Path]],
) -> None:
    """SIGSTOP b while many batches go by (more than --resend-buffer 8): a follows each
    change; once b runs again it is sent a snapshot and lists everything."""
    (a, b), watchers, folders = cluster
    b_target = b.grpc_url
    snapshots_before = [
        w.metric("filewatch_watcher_snapshots_sent_total", target=b_target) for w in watchers
    ]
    assert snapshots_before == [1.0, 1.0, 1.0]
    churn = Churn(*folders, seed=11)
    b.proc.send(signal.SIGSTOP)
    try:
        for round_ in range(4):
            churn_then_check(churn, a, folders, f"a to follow the churn with b frozen ({round_})")
    finally:
        b.proc.send(signal.SIGCONT)
    resumed = time.monotonic()
    wait_for(
        lambda: names(b),
        SYNC_TIMEOUT,
        until=lambda n: n == folder_names(*folders),
        what="b to list everything once it runs again",
    )
    measured("frozen replica complete after SIGCONT", time.monotonic() - resumed)
    snapshots = [
        w.metric("filewatch_watcher_snapshots_sent_total", target=b_target) for w in watchers
    ]
    assert all(n >= 2 for n in snapshots), snapshots
    assert [
        w.metric("filewatch_watcher_snapshots_sent_total", target=a.grpc_url) for w in watchers
    ] == [1.0] * 3
