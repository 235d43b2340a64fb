"""Reading real folders: which entries are files, names as raw bytes (SPEC 4.1, 5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.scanner import FileStat, scan_folder, stat_file

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
