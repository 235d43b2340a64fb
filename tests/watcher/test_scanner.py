"""Reading real folders: which entries are files, names as raw bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gen import filewatch_pb2 as pb
from tests.paths import deep_folder
from watcher.errors import FolderError
from watcher.scanner import (
    MTIME_NS_MAX,
    MTIME_NS_MIN,
    SIZE_MAX,
    FileStat,
    file_stat,
    folder_identity,
    scan_folder,
    stat_file,
    stat_names,
)

MTIME_NS = 1_600_000_000_123_456_789


def make_file(folder: Path | bytes, name: str | bytes, content: bytes = b"hello") -> bytes:
    """Create a regular file with a fixed mtime; returns its raw name."""
    raw_folder = folder if isinstance(folder, bytes) else os.fsencode(folder)
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    path = os.path.join(raw_folder, raw)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return raw


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with every kind of entry the Go watcher wrongly lists as a file."""
    make_file(tmp_path, "cats.txt", b"meow")
    make_file(tmp_path, ".hidden", b"")
    make_file(tmp_path, "with space 'and quotes\".txt", b"12")
    make_file(tmp_path, "😀.txt", b"emoji!")
    (tmp_path / "subfolder").mkdir()
    make_file(tmp_path / "subfolder", "nested.txt")  # not directly in the folder
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "cats.txt", tmp_path / "link-to-file")
    os.symlink(tmp_path / "subfolder", tmp_path / "link-to-folder")
    return tmp_path


def test_scan_lists_regular_files_only(folder: Path) -> None:
    files = scan_folder(os.fsencode(folder))
    assert set(files) == {
        b"cats.txt",
        b".hidden",
        b"with space 'and quotes\".txt",
        "😀.txt".encode(),
        b"link-to-file",  # a symlink counts when it points at a regular file
    }
    assert all(isinstance(name, bytes) for name in files)
    assert files[b"cats.txt"] == FileStat(4, MTIME_NS)
    assert files[b".hidden"] == FileStat(0, MTIME_NS)
    assert files["😀.txt".encode()] == FileStat(6, MTIME_NS)
    assert files[b"link-to-file"] == files[b"cats.txt"]  # the target's stat


def test_scan_agrees_with_stat_file(folder: Path) -> None:
    raw_folder = os.fsencode(folder)
    files = scan_folder(raw_folder)
    for name in os.listdir(raw_folder):
        assert stat_file(raw_folder, name) == files.get(name), name


def test_non_utf8_names_are_kept_as_bytes(tmp_path: Path) -> None:
    raw_folder = os.fsencode(tmp_path)
    odd = [b"\xff.txt", b"\xff\xfe.txt", b"caf\xe9.txt", b"\xed\xa0\x80"]  # latin-1, surrogate
    for name in odd:
        make_file(raw_folder, name, b"x")
    long_name = b"n" * 255
    make_file(raw_folder, long_name, b"yz")
    files = scan_folder(raw_folder)
    assert set(files) == {*odd, long_name}
    assert files[b"\xff.txt"] == FileStat(1, MTIME_NS)
    assert files[long_name] == FileStat(2, MTIME_NS)
    assert stat_file(raw_folder, b"\xff.txt") == FileStat(1, MTIME_NS)


def test_scan_of_an_empty_folder(tmp_path: Path) -> None:
    assert scan_folder(os.fsencode(tmp_path)) == {}


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("missing-folder", id="missing"),
        pytest.param("a-file", id="not-a-folder"),
    ],
)
def test_scan_of_an_unreadable_folder_raises(tmp_path: Path, target: str) -> None:
    make_file(tmp_path, "a-file")
    with pytest.raises(OSError):
        scan_folder(os.fsencode(tmp_path / target))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(b"cats.txt", FileStat(4, MTIME_NS), id="regular"),
        pytest.param(b"link-to-file", FileStat(4, MTIME_NS), id="symlink-to-file"),
        pytest.param(b"missing.txt", None, id="missing"),
        pytest.param(b"subfolder", None, id="folder"),
        pytest.param(b"fifo", None, id="fifo"),
        pytest.param(b"dangling", None, id="dangling-symlink"),
        pytest.param(b"link-to-folder", None, id="symlink-to-folder"),
        pytest.param(b"cats.txt/inside", None, id="below-a-file"),
    ],
)
def test_stat_file(folder: Path, name: bytes, expected: FileStat | None) -> None:
    assert stat_file(os.fsencode(folder), name) == expected


def test_stat_file_sees_the_current_state(tmp_path: Path) -> None:
    raw_folder = os.fsencode(tmp_path)
    make_file(raw_folder, b"f", b"1")
    assert stat_file(raw_folder, b"f") == FileStat(1, MTIME_NS)
    make_file(raw_folder, b"f", b"123")
    assert stat_file(raw_folder, b"f") == FileStat(3, MTIME_NS)
    os.remove(os.path.join(raw_folder, b"f"))
    assert stat_file(raw_folder, b"f") is None
    os.mkdir(os.path.join(raw_folder, b"f"))
    assert stat_file(raw_folder, b"f") is None


# ---------------------------------------------------------------- stats out of range


def _stat_result(size: int, mtime_ns: int) -> os.stat_result:
    """A stat result of a regular file with this size and mtime (any int, as a kernel may say)."""
    seconds = mtime_ns / 1e9
    fields = (0o100644, 1, 1, 1, 0, 0, size, 0, int(seconds), 0)
    return os.stat_result((*fields, 0.0, seconds, 0.0, 0, mtime_ns, 0))


YEAR_3000_NS = 32_503_680_000 * 10**9
YEAR_1600_NS = -11_676_096_000 * 10**9
YEAR_1960_NS = -315_619_200 * 10**9


@pytest.mark.parametrize(
    ("size", "mtime_ns", "expected"),
    [
        pytest.param(5, MTIME_NS, FileStat(5, MTIME_NS), id="ordinary"),
        pytest.param(0, YEAR_1960_NS, FileStat(0, YEAR_1960_NS), id="before-1970-exact"),
        pytest.param(1, 0, FileStat(1, 0), id="the-epoch"),
        pytest.param(1, MTIME_NS_MAX, FileStat(1, MTIME_NS_MAX), id="int64-max-exact"),
        pytest.param(1, MTIME_NS_MIN, FileStat(1, MTIME_NS_MIN), id="int64-min-exact"),
        pytest.param(1, YEAR_3000_NS, FileStat(1, MTIME_NS_MAX), id="year-3000-to-2262"),
        pytest.param(1, MTIME_NS_MAX + 1, FileStat(1, MTIME_NS_MAX), id="one-past-int64"),
        pytest.param(1, YEAR_1600_NS, FileStat(1, MTIME_NS_MIN), id="year-1600-to-1677"),
        pytest.param(1, MTIME_NS_MIN - 1, FileStat(1, MTIME_NS_MIN), id="one-before-int64"),
        pytest.param(SIZE_MAX, 0, FileStat(SIZE_MAX, 0), id="uint64-max-size-exact"),
        pytest.param(SIZE_MAX + 1, 0, FileStat(SIZE_MAX, 0), id="size-past-uint64"),
        pytest.param(-1, 0, FileStat(0, 0), id="negative-size-to-0"),
    ],
)
def test_file_stat_clamps_each_value_into_the_wire_range(
    size: int, mtime_ns: int, expected: FileStat
) -> None:
    assert file_stat(_stat_result(size, mtime_ns)) == expected


def test_every_clamped_stat_fits_the_proto(tmp_path: Path) -> None:
    """What the scan and stat_file read from real files dated 3000 and 1600 encodes."""
    raw = os.fsencode(tmp_path)
    for name, when in ((b"future", YEAR_3000_NS), (b"past", YEAR_1600_NS), (b"60s", YEAR_1960_NS)):
        make_file(raw, name)
        os.utime(os.path.join(raw, name), ns=(when, when))
    files = scan_folder(raw)
    assert files == {n: stat_file(raw, n) for n in files}
    assert files[b"future"].mtime_ns == MTIME_NS_MAX  # the file system keeps > 2262 (ext4: 2446)
    assert files[b"60s"].mtime_ns == YEAR_1960_NS
    chunk = pb.WatcherMessage()
    for name, (size, mtime_ns) in files.items():
        chunk.snapshot_chunk.files.add(name=name, size=size, mtime_ns=mtime_ns)
    assert len(chunk.SerializeToString()) > 0


# ---------------------------------------------------------------- long paths


def test_names_are_stated_relative_to_the_folder_past_path_max(tmp_path: Path) -> None:
    folder = os.fsencode(deep_folder(tmp_path, 4030))
    name = b"n" * 200
    make_file(folder, b"short")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        file_fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(file_fd, b"abc")
        os.close(file_fd)
        mtime_ns = os.stat(name, dir_fd=fd).st_mtime_ns
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="too long"):
        os.stat(os.path.join(folder, name))  # folder/name: 4,231 bytes, over PATH_MAX
    assert stat_file(folder, name) == FileStat(3, mtime_ns)
    assert stat_names(folder, [name, b"short", b"gone"]) == [
        (name, FileStat(3, mtime_ns)),
        (b"short", FileStat(5, MTIME_NS)),
        (b"gone", None),
    ]
    assert scan_folder(folder)[name] == FileStat(3, mtime_ns)


def test_stat_names_of_a_folder_that_cannot_be_opened(tmp_path: Path) -> None:
    assert stat_names(os.fsencode(tmp_path / "missing"), [b"a", b"b"]) == [
        (b"a", None),
        (b"b", None),
    ]


@pytest.mark.parametrize(
    ("path", "state", "reason"),
    [
        pytest.param("missing", "missing", "does not exist", id="missing"),
        pytest.param("a-file", "missing", "is not a folder", id="a-file"),
        pytest.param("a-file/below", "missing", "is not a folder", id="below-a-file"),
        pytest.param(
            "d/" * 2100,
            "error",
            "path too long: {length:,} bytes, the limit is 4,095 (PATH_MAX)",
            id="path-too-long",
        ),
        pytest.param(
            "x" * 300,
            "error",
            "a path component is too long: 300 bytes, the limit is 255 (NAME_MAX)",
            id="name-too-long",
        ),
    ],
)
def test_folder_identity_tells_the_causes_apart(
    tmp_path: Path, path: str, state: str, reason: str
) -> None:
    make_file(tmp_path, "a-file")
    target = os.fsencode(tmp_path / path)
    with pytest.raises(FolderError) as caught:
        folder_identity(target)
    assert caught.value.state == state
    assert str(caught.value).startswith(reason.format(length=len(target)))


def test_folder_identity_of_a_folder(tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    assert folder_identity(os.fsencode(tmp_path)) == (st.st_dev, st.st_ino)
    deep = deep_folder(tmp_path, 4090)
    assert folder_identity(os.fsencode(deep)) == (os.stat(deep).st_dev, os.stat(deep).st_ino)
