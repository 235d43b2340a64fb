"""The folder's observers: what each hands on, and which one runs.

Two implementations follow a folder's entries:
- `inotify` (Linux, the default there): the inotify descriptor read inside the
  event loop (`watcher.inotify_events`), no thread;
- `watchdog` (everywhere; the default elsewhere): watchdog's observer thread,
  handing each event to the loop (`watcher.fs_events`).
Both report the same thing, `(name, stat or None)` pairs, to the same sink.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Protocol

from watcher.scanner import FileStat

Observation = list[tuple[bytes, FileStat | None]]
Sink = Callable[[Observation, int], None]
"""Gets each observation and the time (ns since the epoch) it was made."""

KINDS = ("auto", "inotify", "watchdog")


class Observer(Protocol):
    """Follows one folder's entries until stopped."""

    def start(self) -> None:
        """Start watching (raises OSError if the folder cannot be watched)."""
        ...

    def is_alive(self) -> bool:
        """Whether it still watches."""
        ...

    async def stop(self) -> None:
        """Stop watching and release what it holds."""
        ...


def resolve(kind: str) -> str:
    """The observer `auto` stands for here: inotify on Linux, watchdog elsewhere."""
    if kind == "auto":
        return "inotify" if sys.platform.startswith("linux") else "watchdog"
    return kind


def make_observer(
    kind: str,
    folder: bytes,
    loop: asyncio.AbstractEventLoop,
    sink: Sink,
    on_overflow: Callable[[], None],
    *,
    read_interval: float = 0.0,
    read_interval_max: float = 0.0,
) -> Observer:
    """An observer of `kind` (one of KINDS) on `folder`.

    `read_interval`: least seconds between two reads of the kernel's events
    while they keep coming, growing up to `read_interval_max` while each read
    finds more (inotify; watchdog's threads read as they come).
    """
    if resolve(kind) == "inotify":
        from watcher.inotify_events import InotifyObserver  # noqa: PLC0415 (Linux only)

        return InotifyObserver(
            folder,
            loop,
            sink,
            on_overflow,
            read_interval=read_interval,
            read_interval_max=read_interval_max,
        )
    from watcher.fs_events import FolderObserver  # noqa: PLC0415 (imports watchdog)

    return FolderObserver(folder, loop, sink)
