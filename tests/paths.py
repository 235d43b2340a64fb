"""Folders whose absolute path is as long as a test needs, up to and past PATH_MAX.

The kernel refuses a path of PATH_MAX (4,096) bytes or more in one call, so a
deep folder is made one level at a time, each `mkdir` relative to a descriptor
of its parent; a path under the limit can then be used whole.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

LEVEL = 200
"""Bytes of each directory name (NAME_MAX is 255)."""


def deep_folder(base: Path, length: int) -> Path:
    """A folder under `base` whose absolute path is exactly `length` bytes.

    Its levels are named d...d; another call on the same `base` reuses those it shares.
    """
    path = os.fsencode(base.resolve())
    if length - len(path) < 3:
        raise ValueError(f"{base} is already {len(path)} bytes long")
    flags = os.O_RDONLY | os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        while (remaining := length - len(path)) > 0:
            size = min(LEVEL, remaining - 1)  # "/" + name
            if remaining - 1 - size == 1:  # one byte left over cannot make a level
                size -= 1
            name = b"d" * size
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            child = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = child
            path += b"/" + name
    finally:
        os.close(fd)
    assert len(path) == length
    return Path(os.fsdecode(path))
