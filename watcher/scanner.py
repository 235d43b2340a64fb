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
    with os.scandir(folder) as it:
        for entry in it:
            try:
                if not entry.is_file():  # follows symlinks, like the stat above
                    continue
                st = entry.stat()
            except OSError:
                continue  # vanished between listing and stat
            files[entry.name] = FileStat(st.st_size, st.st_mtime_ns)
    return files
