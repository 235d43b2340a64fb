"""Pure folder reading: which regular files lie directly in a folder, and their stats.

Names are bytes, exactly as the file system holds them. Subfolders, FIFOs,
sockets and devices are not files; a symlink counts when it points at a
regular file.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple


class FileStat(NamedTuple):
    """Size and modification time of one file."""

    size: int
    mtime_ns: int


def stat_file(folder: bytes, name: bytes) -> FileStat | None:
    """The stat of `folder/name` if it is a regular file now, else None."""
    try:
        st = os.stat(os.path.join(folder, name))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileStat(st.st_size, st.st_mtime_ns)


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
                files[os.fsencode(entry.name)] = FileStat(st.st_size, st.st_mtime_ns)
    finally:
        os.close(fd)
    return files
