"""Pure folder reading: which regular files lie directly in a folder, and their stats.

Names are bytes, exactly as the file system holds them. Subfolders, FIFOs,
sockets and devices are not files; a symlink counts when it points at a
regular file.

Every stat is read relative to a descriptor of the folder (`fstatat`), never
through `folder/name`: a folder whose path is near PATH_MAX (4,096 bytes on
Linux) still has every file in it stat'ed, however long the name.

Out-of-range stats are clamped, by one rule, here where they are read
(`file_stat`): the wire carries a size as uint64 and an mtime as int64
nanoseconds since the epoch (1677-09-21 to 2262-04-11), and a value outside its
range is replaced by the nearest end of that range (a file dated in the year
3000 is listed as modified at 2262-04-11T23:47:16.854775807Z, one dated 1600 at
1677-09-21T00:12:43.145224192Z, a negative size as 0). Every value inside the
range is carried exactly, mtimes before 1970 (negative) included.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from typing import NamedTuple

from watcher.errors import FolderError

MTIME_NS_MIN = -(1 << 63)
"""The earliest mtime the wire carries (int64 nanoseconds): 1677-09-21."""
MTIME_NS_MAX = (1 << 63) - 1
"""The latest mtime the wire carries (int64 nanoseconds): 2262-04-11."""
SIZE_MAX = (1 << 64) - 1
"""The largest size the wire carries (uint64)."""

# A descriptor to stat relative to, and nothing more: O_PATH needs no read
# permission on the folder (search permission is enough, as for a plain stat).
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY


def _too_long(path: bytes) -> str:
    path_max = os.pathconf(b"/", "PC_PATH_MAX")  # counts the final NUL
    if len(path) >= path_max:
        return f"path too long: {len(path):,} bytes, the limit is {path_max - 1:,} (PATH_MAX)"
    name_max = os.pathconf(b"/", "PC_NAME_MAX")
    longest = max(len(part) for part in path.split(b"/"))
    return f"a path component is too long: {longest:,} bytes, the limit is {name_max:,} (NAME_MAX)"


def folder_identity(folder: bytes) -> tuple[int, int]:
    """(device, inode) of `folder`; raises FolderError saying why it is not a usable folder."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        raise FolderError("does not exist", "missing") from None
    except NotADirectoryError:
        raise FolderError("is not a folder (a part of its path is a file)", "missing") from None
    except PermissionError as err:
        raise FolderError(f"permission denied ({err.strerror})", "unreadable") from None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise FolderError(_too_long(folder), "error") from None
        raise FolderError(err.strerror or str(err), "error") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FolderError("is not a folder", "missing")
    return st.st_dev, st.st_ino


class FileStat(NamedTuple):
    """Size and modification time of one file."""

    size: int
    mtime_ns: int


def file_stat(st: os.stat_result) -> FileStat:
    """The FileStat of a stat result, each value clamped into the wire's range (see above)."""
    size, mtime_ns = st.st_size, st.st_mtime_ns
    if not 0 <= size <= SIZE_MAX:
        size = 0 if size < 0 else SIZE_MAX
    if not MTIME_NS_MIN <= mtime_ns <= MTIME_NS_MAX:
        mtime_ns = MTIME_NS_MIN if mtime_ns < 0 else MTIME_NS_MAX
    return FileStat(size, mtime_ns)


def open_folder(folder: bytes) -> int:
    """A descriptor of `folder` to stat its entries relative to (close it with os.close).

    Raises OSError if it is not an accessible folder.
    """
    return os.open(folder, _DIR_FLAGS)


def stat_at(dir_fd: int, name: bytes) -> FileStat | None:
    """The stat of `name` in the folder open as `dir_fd` if it is a regular file now, else None."""
    try:
        st = os.stat(name, dir_fd=dir_fd)
    except OSError:  # gone, not reachable, or below something that is not a folder
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return file_stat(st)


def stat_names(folder: bytes, names: Iterable[bytes]) -> list[tuple[bytes, FileStat | None]]:
    """Each name with its `stat_at`, all relative to one descriptor of `folder`.

    A folder that cannot be opened holds no file: every name gets None.
    """
    try:
        fd = open_folder(folder)
    except OSError:
        return [(name, None) for name in names]
    try:
        return [(name, stat_at(fd, name)) for name in names]
    finally:
        os.close(fd)


def stat_file(folder: bytes, name: bytes) -> FileStat | None:
    """The stat of `name` in `folder` if it is a regular file now, else None."""
    return stat_names(folder, [name])[0][1]


def scan_folder(folder: bytes) -> dict[bytes, FileStat]:
    """Every regular file directly in `folder`. Raises OSError if it cannot be read."""
    files: dict[bytes, FileStat] = {}
    # Listed through a descriptor, each entry is stat'ed relative to it (fstatat):
    # the kernel walks one name, not the folder's whole path, 100k times over.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    if not entry.is_file():  # follows symlinks, like the stat above
                        continue
                    st = entry.stat()
                except OSError:
                    continue  # vanished between listing and stat
                # Listed by descriptor, names come as str: back to the exact bytes.
                files[os.fsencode(entry.name)] = file_stat(st)
    finally:
        os.close(fd)
    return files
