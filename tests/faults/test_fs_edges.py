"""What the file system can hold that the wire and the kernel's path calls cannot.

- Times outside int64 nanoseconds (before 1677-09-21, after 2262-04-11): set with
  os.utime on real files, on tmpfs where there is one (it keeps any 64-bit time;
  ext4 keeps 1901 to 2446, which still reaches past 2262).
- Paths near and past PATH_MAX (4,096 bytes): folders nested one level at a time
  (tests.paths.deep_folder), a 200-byte name in a 4,030-byte folder making
  folder/name too long for a plain stat.
- A folder whose parent loses its search permission: there, but out of reach
  (the watcher unprivileged, as in test_watcher_faults).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.names import rfc3339
from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    WatcherFactory,
    fill,
    folder_names,
    wait_listed,
    without_root_bypass,
)
from tests.paths import deep_folder
from tests.support import http_request, wait_for

YEAR_3000_NS = 32_503_680_000 * 10**9
YEAR_1600_NS = -11_676_096_000 * 10**9
YEAR_1960_NS = -315_619_200 * 10**9
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
QUIET_RESCAN = ("--rescan-interval", "120")
"""No periodic rescan within a test: what shows up came from the observer."""
CHECK = 0.2
"""The watchers' --folder-check-interval here."""


@pytest.fixture
def wide_time_folder(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on tmpfs if there is one (any 64-bit time), else in tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="filewatch-times-", dir=shm))
        try:
            yield path
        finally:
            shutil.rmtree(path)
    else:
        path = tmp_path / "times"
        path.mkdir()
        yield path


def _dated(folder: Path, name: str, mtime_ns: int, staging: Path | None = None) -> None:
    """A file dated `mtime_ns`; made in `staging` then moved in, if given (one event, dated)."""
    made = (staging or folder) / name
    made.write_bytes(name.encode())
    os.utime(made, ns=(mtime_ns, mtime_ns))
    if staging is not None:
        os.rename(made, folder / name)


def _expected_modified(path: Path) -> str:
    """What GET /files/?detail=1 must say: the file's mtime, clamped into int64 ns."""
    return rfc3339(min(max(path.stat().st_mtime_ns, INT64_MIN), INT64_MAX))


@pytest.mark.timeout(60)
def test_files_dated_outside_int64_nanoseconds_are_listed_and_the_watcher_lives(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    wide_time_folder: Path,
) -> None:
    folder = wide_time_folder / "w"
    staging = wide_time_folder / "staging"
    folder.mkdir()
    staging.mkdir()
    _dated(folder, "in-the-snapshot-3000.txt", YEAR_3000_NS)  # encoded in the first snapshot
    agg = start_aggregator(ttl=30.0)
    w = start_watcher(folder, agg.grpc_url, *QUIET_RESCAN, name="times")
    # Moved in already dated: one event, whose stat goes out in a batch.
    _dated(folder, "year-3000.txt", YEAR_3000_NS, staging)
    _dated(folder, "year-1600.txt", YEAR_1600_NS, staging)
    _dated(folder, "year-1960.txt", YEAR_1960_NS, staging)
    expected = {
        name: _expected_modified(folder / name)
        for name in ("in-the-snapshot-3000.txt", "year-3000.txt", "year-1600.txt", "year-1960.txt")
    }
    assert expected["year-3000.txt"].startswith("2262-04-11T23:47:16")
    assert expected["year-1960.txt"] == "1960-01-01T00:00:00.000000Z"  # carried exactly
    if (folder / "year-1600.txt").stat().st_mtime_ns < INT64_MIN:  # tmpfs kept 1600
        assert expected["year-1600.txt"].startswith("1677-09-21T00:12:43")

    def listed() -> dict[str, str]:
        return {e["filename"]: e["modified"] for e in agg.entries() if e["node"] == "times"}

    wait_for(listed, SYNC_TIMEOUT, until=lambda got: got == expected, what="all four, dated")
    assert w.proc.alive
    assert w.healthz()["status"] == "ok"
    assert w.proc.count("stream_failed") == 0, "the stream never broke"
    assert sorted(w.own_files()) == sorted(expected)


@pytest.mark.timeout(60)
def test_a_long_name_in_a_folder_near_path_max_stays_listed_through_its_writes(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    folder = deep_folder(tmp_path, 4030)
    raw_folder = os.fsencode(folder)
    before = "b" * 200  # listed by the first scan, then written to
    after = "a" * 200  # created while watched, then written to
    assert len(raw_folder) + 1 + len(after) > 4096, "folder/name is over PATH_MAX"
    dir_fd = os.open(raw_folder, os.O_RDONLY | os.O_DIRECTORY)

    def write(name: str, data: bytes, flags: int = os.O_WRONLY | os.O_APPEND) -> None:
        fd = os.open(name, os.O_CREAT | flags, 0o644, dir_fd=dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    try:
        write(before, b"0")
        agg = start_aggregator(ttl=30.0)
        w = start_watcher(
            folder,
            agg.grpc_url,
            *QUIET_RESCAN,
            "--folder-check-interval", str(CHECK),
            name="deep",
        )  # fmt: skip

        def listed_at(size: int) -> None:
            want = {before: size, after: size}
            wait_for(
                lambda: {e["filename"]: e["size"] for e in agg.entries() if e["node"] == "deep"},
                SYNC_TIMEOUT,
                until=lambda got: got == want,
                what=f"both long names listed at {size} bytes",
            )
            assert w.own_files() == sorted(want)

        write(after, b"0")
        listed_at(1)
        for size in range(2, 7):  # several writes to each, each one seen with its size
            write(before, b"x")
            write(after, b"x")
            listed_at(size)
    finally:
        os.close(dir_fd)
    assert w.healthz()["folder_state"] == "ok"
    assert w.proc.count("folder_missing") == 0, "the supervisor's check never misreported"
    assert w.proc.count("rescan_repaired") == 0


@pytest.mark.timeout(30)
def test_a_folder_path_over_path_max_is_refused_clearly(
    start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    folder = deep_folder(tmp_path, 4200)
    w = start_watcher(folder, "grpc://127.0.0.1:1", wait=False)
    assert w.proc.wait_exit() != 0
    log = w.proc.log_text()
    assert "path too long: 4,200 bytes, the limit is 4,095 (PATH_MAX)" in log, log
    assert "does not exist" not in log


# ---------------------------------------------------------------- out of reach, not missing


@pytest.mark.timeout(60)
def test_a_folder_whose_parent_is_out_of_reach_is_not_reported_missing(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, shared_dir: Path
) -> None:
    prefix = without_root_bypass()
    parent = shared_dir / "parent"
    folder = parent / "w"
    fill(folder, 5)
    for path in (parent, folder):
        path.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o644)
    agg = start_aggregator(ttl=30.0)
    w = start_watcher(
        folder,
        agg.grpc_url,
        *QUIET_RESCAN,
        "--folder-check-interval", str(CHECK),
        name="w",
        prefix=prefix,
    )  # fmt: skip
    wait_listed(agg, "w", folder, what="the folder listed", timeout=SYNC_TIMEOUT)

    parent.chmod(0o600)  # no search permission: the folder is there, out of reach
    failed = w.proc.wait_event("folder_check_failed", timeout=CHECK + 3)
    assert failed["folder_state"] == "unreadable", failed
    assert "permission denied" in failed["error"], failed
    wait_for(w.healthz, 3, until=lambda h: h["folder_state"] == "unreadable", what="healthz")
    assert w.proc.count("folder_missing") == 0
    parent.chmod(0o755)
    assert agg.node_files("w") == folder_names(folder), "its files stayed listed meanwhile"

    w.proc.wait_event("folder_back", timeout=CHECK + 3)
    wait_for(w.healthz, 3, until=lambda h: h["folder_state"] == "ok", what="healthz ok")
    (folder / "after.txt").write_text("a")
    wait_listed(agg, "w", folder, what="a change seen again", timeout=SYNC_TIMEOUT)
    assert http_request(w.http_port, "GET", "/healthz").status == 200
