"""The bridge from watchdog's observer thread to the event loop.

The only module that imports watchdog. The observer thread stats each name an
event touches (so no file-system call runs on the event loop) and hands
`(name, stat or None)` pairs to the loop with `call_soon_threadsafe`. Whatever
the event type, the current state of the name is what counts: a late or
duplicated event can only confirm the truth, never invent a file.

Names are stat'ed relative to a descriptor of the folder opened at `start`
(`fstatat`), not through `folder/name`: near PATH_MAX the joined path is too
long for the kernel, and a file would seem to vanish at its first write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

from watchdog.events import (
    FileAttribEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from watcher.observers import Sink
from watcher.scanner import open_folder, stat_at

# The events that can change which regular files exist or their size and mtime.
# Watchdog builds the inotify mask from them, so the kernel does not even queue
# opens, closes or the folder's own "modified" (a plain create would otherwise
# bring five events, each through three threads). A file's last write reports
# its final size; a close adds nothing to that.
# FileAttribEvent costs no extra kernel event (watchdog's mask for "modified"
# has IN_ATTRIB already) but without it in the filter a `touch` or `utime` that
# sets a file's time would be dropped, and seen only at the next rescan.
_EVENTS = [FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileAttribEvent, FileMovedEvent]

# On Linux watchdog holds an IN_MOVED_FROM for 0.5 s, hoping to pair it with its
# IN_MOVED_TO, and every later event waits behind it: a file moved out of the
# folder would vanish half a second late, and a change right after it too. We
# stat every name an event touches, so a rename that arrives as "deleted" plus
# "created" ends the same; the two halves of a rename inside the folder come in
# one read of the inotify queue, so 2 ms still pairs them.
_MOVE_PAIRING_SECONDS = 0.002
with contextlib.suppress(ImportError):  # where watchdog has no such grouper, nothing to do
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    InotifyMoveEventGrouper.delay = _MOVE_PAIRING_SECONDS


class _Handler(FileSystemEventHandler):
    def __init__(self, folder: bytes, loop: asyncio.AbstractEventLoop, sink: Sink) -> None:
        self._folder = folder
        self._loop = loop
        self._sink = sink
        # The folder's descriptor while watching; the lock keeps `close` from
        # closing it (and the number from being reused) under a stat.
        self._dir_fd: int | None = None
        self._fd_lock = threading.Lock()

    def open(self) -> None:
        """Open the folder's descriptor (raises OSError if it is not an accessible folder)."""
        fd = open_folder(self._folder)
        with self._fd_lock:
            old, self._dir_fd = self._dir_fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """Close the folder's descriptor; events after this are ignored."""
        with self._fd_lock:
            fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def _name(self, path: str | bytes) -> bytes | None:
        raw = os.fsencode(path)
        parent, name = os.path.split(raw)
        if parent != self._folder or not name:
            return None  # the folder itself, or something deeper
        return name

    def on_any_event(self, event: FileSystemEvent) -> None:
        observed = time.time_ns()
        names = [self._name(event.src_path)]
        if event.dest_path:
            names.append(self._name(event.dest_path))
        # A rename is one observation: both names reach the loop together.
        with self._fd_lock:
            fd = self._dir_fd
            if fd is None:
                return  # stopped
            obs = [(n, stat_at(fd, n)) for n in names if n is not None]
        if obs:
            self._loop.call_soon_threadsafe(self._sink, obs, observed)


class FolderObserver:
    """A watchdog observer on one folder, non-recursive."""

    def __init__(self, folder: bytes, loop: asyncio.AbstractEventLoop, sink: Sink) -> None:
        self._folder = os.path.abspath(folder)
        self._handler = _Handler(self._folder, loop, sink)
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        """Start watching (raises OSError if the folder cannot be watched)."""
        self._handler.open()
        try:
            observer = Observer()
            observer.schedule(
                self._handler, os.fsdecode(self._folder), recursive=False, event_filter=_EVENTS
            )
            observer.daemon = True
            observer.start()
        except BaseException:
            self._handler.close()
            raise
        self._observer = observer

    def is_alive(self) -> bool:
        """Whether the observer thread is running."""
        return self._observer is not None and self._observer.is_alive()

    async def stop(self) -> None:
        """Stop the observer, join its thread off the event loop, close the folder's descriptor."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
        await asyncio.to_thread(self._handler.close)
