"""Faults inside a watcher: lost file-system events, a dead observer, a folder that goes.

How each fault is made real:
- dropped events: the watcher is stopped (SIGSTOP) while enough files are
  written to overflow the kernel's inotify queue (16,384 events by default,
  so ~10,000 files): the kernel drops events and the observer logs the overflow. Also a
  file modified through a hard link outside the folder, which inotify on the
  folder never reports.
- a dead observer: the watcher runs under a `python -c` shim that makes the
  observer raise once (on a file named kill-observer): watchdog's handler, which
  ends watchdog's dispatch thread, or the in-loop inotify observer's stat, which
  ends that observer, exactly as any unexpected exception would.
Every test runs with each observer (`--observer inotify` and `watchdog`).
- the folder deleted, replaced (an atomic exchange with another folder, as a
  deployment would do) or unreadable (chmod 000, the watcher running as an
  unprivileged user when the tests run as root).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    Watcher,
    WatcherFactory,
    fill,
    measured,
    wait_listed,
    without_root_bypass,
)
from tests.support import wait_for

CHECK = 0.3
"""The watchers' --folder-check-interval here."""
SLACK = 3.0
QUIET_RESCAN = ("--rescan-interval", "120")
"""No periodic rescan within a test: whatever shows up promptly came from the observer."""

OBSERVER_KILLER = """
import runpy, sys
import watcher.fs_events as fs
import watcher.inotify_events as ino

_fired = []

def _kill_once(name):
    if not _fired and "kill-observer" in str(name):
        _fired.append(True)
        raise RuntimeError("injected fault: the observer dies")

_on_any_event = fs._Handler.on_any_event
def on_any_event(self, event):
    _kill_once(event.src_path)
    return _on_any_event(self, event)
fs._Handler.on_any_event = on_any_event

_stat_at = ino.stat_at
def stat_at(fd, name):
    _kill_once(name)
    return _stat_at(fd, name)
ino.stat_at = stat_at
sys.argv = ["watcher", *sys.argv[1:]]
runpy.run_module("watcher", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(params=["inotify", "watchdog"])
def observer(request: pytest.FixtureRequest) -> str:
    """Each test runs with both observers."""
    return str(request.param)


def _inotify_queue_limit() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return 16384


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)


@pytest.mark.timeout(60)
def test_events_dropped_by_the_kernel_are_repaired_by_the_rescan_logged_and_counted(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    tmp_path: Path,
    observer: str,
) -> None:
    folder = tmp_path / "w"
    fill(folder, 10)
    agg = start_aggregator(ttl=30.0)
    w = start_watcher(
        folder, agg.grpc_url, "--observer", observer, "--rescan-interval", "0.5", name="w"
    )
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    # At least 2 inotify events per file written (create, close): beyond the kernel's queue.
    burst = _inotify_queue_limit() // 2 + 2000
    if burst > 60_000:
        pytest.skip(f"the inotify queue holds {burst * 2} events: too many files to overflow it")
    w.proc.send(signal.SIGSTOP)
    try:
        fill(folder, burst, "burst")
    finally:
        w.proc.send(signal.SIGCONT)
    resumed = time.monotonic()
    took = wait_listed(
        agg, "w", folder, what="the burst listed after the overflow", timeout=0.6 + SLACK + 10
    )
    measured(f"inotify overflow ({burst} files, {observer}) -> list repaired", took)
    overflow_logged = {"watchdog": "Inotify queue overflowed", "inotify": "inotify_overflow"}
    assert overflow_logged[observer] in w.proc.log_text(), "the kernel really dropped events"
    repaired = w.proc.wait_event("rescan_repaired", timeout=1.0)
    assert repaired["changes"] > 0
    assert w.metric("filewatch_watcher_rescan_changes_total") >= repaired["changes"]
    assert time.monotonic() - resumed < 30

    # A change inotify on the folder never reports: a write through a hard link elsewhere.
    outside = tmp_path / "outside"
    outside.mkdir()
    os.link(folder / "f00000.txt", outside / "link.txt")
    before = w.metric("filewatch_watcher_rescan_changes_total")
    (outside / "link.txt").write_bytes(b"x" * 4321)

    def size() -> object:
        entry = [e for e in agg.entries() if e["filename"] == "f00000.txt"]
        return entry[0]["size"] if entry else None

    wait_for(size, 0.6 + SLACK, until=lambda s: s == 4321, what="the new size via the rescan")
    assert w.metric("filewatch_watcher_rescan_changes_total") == before + 1


@pytest.mark.timeout(60)
def test_a_dead_observer_is_restarted_and_what_it_missed_is_repaired(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    tmp_path: Path,
    observer: str,
) -> None:
    folder = tmp_path / "w"
    fill(folder, 10)
    agg = start_aggregator(ttl=30.0)
    w = start_watcher(
        folder,
        agg.grpc_url,
        "--observer", observer,
        *QUIET_RESCAN,
        "--folder-check-interval", str(CHECK),
        name="w",
        code=OBSERVER_KILLER,
    )  # fmt: skip
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    died = time.monotonic()
    (folder / "kill-observer").write_text("boom")
    wait_for(
        lambda: "injected fault: the observer dies" in w.proc.log_text(),
        5,
        what="the observer to die",
    )
    fill(folder, 20, "unseen")  # nobody watches now
    os.unlink(folder / "f00000.txt")
    w.proc.wait_event("observer_restarted", timeout=CHECK + SLACK)
    wait_listed(agg, "w", folder, what="what the dead observer missed", timeout=CHECK + SLACK)
    measured(f"observer died ({observer}) -> restarted, list repaired", time.monotonic() - died)
    repaired = w.proc.wait_event("rescan_repaired", timeout=1.0)
    assert repaired["changes"] >= 21
    assert w.metric("filewatch_watcher_rescan_changes_total") >= 21

    # The new observer reports at once (no periodic rescan runs in this test).
    (folder / "after-restart.txt").write_text("a")
    took = wait_listed(
        agg, "w", folder, what="a change seen by the new observer", timeout=SYNC_TIMEOUT
    )
    assert took < 5


@pytest.mark.timeout(60)
def test_a_deleted_folder_is_reported_and_followed_when_it_comes_back(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    tmp_path: Path,
    observer: str,
) -> None:
    folder = tmp_path / "w"
    fill(folder, 20)
    agg = start_aggregator(ttl=30.0)
    w = start_watcher(
        folder,
        agg.grpc_url,
        "--observer",
        observer,
        *QUIET_RESCAN,
        "--folder-check-interval",
        str(CHECK),
        name="w",
    )
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    deleted = time.monotonic()
    shutil.rmtree(folder)
    missing = w.proc.wait_event("folder_missing", timeout=CHECK + SLACK)
    assert missing["level"] == "error"
    wait_for(w.healthz, SLACK, until=lambda h: h["folder_state"] == "missing", what="healthz")
    assert w.own_files() == []
    wait_for(lambda: agg.node_files("w"), SLACK, until=lambda f: f == [], what="no files listed")
    measured("folder deleted -> reported missing, nothing listed", time.monotonic() - deleted)
    assert w.proc.alive

    back = time.monotonic()
    fill(folder, 5, "second-life")
    w.proc.wait_event("folder_back", timeout=CHECK + SLACK)
    wait_listed(agg, "w", folder, what="the folder back", timeout=CHECK + SLACK)
    measured("folder recreated -> listed again", time.monotonic() - back)
    assert w.healthz()["folder_state"] == "ok"
    (folder / "seen-by-the-new-observer.txt").write_text("a")
    assert (
        wait_listed(agg, "w", folder, what="a change in the new folder", timeout=SYNC_TIMEOUT) < 5
    )


@pytest.mark.timeout(60)
def test_a_replaced_folder_is_followed_and_the_old_one_forgotten(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    tmp_path: Path,
    observer: str,
) -> None:
    folder, other = tmp_path / "w", tmp_path / "replacement"
    fill(folder, 20)
    fill(other, 7, "replacement")
    agg = start_aggregator(ttl=30.0)
    w = start_watcher(
        folder,
        agg.grpc_url,
        "--observer",
        observer,
        *QUIET_RESCAN,
        "--folder-check-interval",
        str(CHECK),
        name="w",
    )
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    replaced = time.monotonic()
    atomic = _exchange(folder, other)  # `other` now holds the old folder
    if not atomic:
        os.rename(folder, tmp_path / "old")
        os.rename(other, folder)
        other = tmp_path / "old"
    back = w.proc.wait_event("folder_back", timeout=CHECK + SLACK)
    if atomic:
        assert back["replaced"] is True
    wait_listed(agg, "w", folder, what="the replacement folder listed", timeout=CHECK + SLACK)
    measured("folder replaced (atomic exchange) -> new folder listed", time.monotonic() - replaced)

    (other / "in-the-old-folder.txt").write_text("a")
    (folder / "in-the-new-folder.txt").write_text("a")
    assert (
        wait_listed(agg, "w", folder, what="a change in the new folder", timeout=SYNC_TIMEOUT) < 5
    )
    time.sleep(0.5)  # would the old folder's change still arrive? (nothing to poll for)
    assert "in-the-old-folder.txt" not in agg.node_files("w")


@pytest.mark.timeout(60)
def test_an_unreadable_folder_is_reported_and_recovered(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    shared_dir: Path,
    observer: str,
) -> None:
    prefix = without_root_bypass()
    folder = shared_dir / "w"
    fill(folder, 10)
    folder.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o644)
    agg = start_aggregator(ttl=30.0)
    w: Watcher = start_watcher(
        folder,
        agg.grpc_url,
        "--observer", observer,
        "--rescan-interval", "0.5",
        "--folder-check-interval", str(CHECK),
        name="w",
        prefix=prefix,
    )  # fmt: skip
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    folder.chmod(0)
    blocked = time.monotonic()
    failed = w.proc.wait_event("rescan_failed", timeout=0.6 + SLACK)
    assert failed["level"] == "error" and failed["folder_state"] == "unreadable", failed
    assert w.healthz()["folder_state"] == "unreadable"
    measured("folder unreadable -> reported", time.monotonic() - blocked)
    fill(folder, 3, "while-unreadable")
    assert w.proc.alive

    folder.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o644)
    readable = time.monotonic()
    w.proc.wait_event("folder_ok", timeout=0.6 + SLACK)
    wait_listed(agg, "w", folder, what="the folder listed once readable", timeout=0.6 + SLACK)
    measured("folder readable again -> list equals folder", time.monotonic() - readable)
    assert w.healthz()["folder_state"] == "ok"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
