"""Linux: the folder's inotify descriptor, read inside the event loop.

No thread and no hand-off: `loop.add_reader` calls back when the kernel has
events, and each read becomes one observation. Watchdog's path (see
`fs_events`) takes an event through its reader thread, its dispatcher thread
and `call_soon_threadsafe`: here a create reaches the state in one callback.

Each name an event touches is stat'ed once per read, relative to a descriptor
of the folder (`fstatat`): a few microseconds on a local file system, so the
stat runs on the loop. Whatever the events say, the current state of the name
is what counts (as in `fs_events`): a create followed by writes is one stat,
and a rename's two names come in the same read.

While changes keep coming, reads are spaced out: after a read, the next
waits `read_interval` (the watcher's `--batch-interval`), and what the kernel
queued meanwhile comes in one read. Each read that finds changes waiting
doubles the wait, up to `read_interval_max` (`--batch-interval-max`); a read
that finds none puts it back and hands the descriptor to the loop again, so
a change after a quieter spell is read at once. Waking the process costs more
than handling a change (a few hundred microseconds on a small VM), so the
reads per second, not the changes, set the CPU: in the churn bench (10
folders at 500 changes/s each), reading every 5 ms cost 0.20 ms of watcher
CPU per change; growing to 20 ms, 0.086 ms; to 40 ms, 0.056 ms (and the
aggregator's 0.094, 0.087 and 0.060 ms: it gets fewer, larger batches).
The kernel also merges repeated events of a name while they wait.

A queue overflow (the kernel dropped events) asks for a rescan at once. The
folder itself deleted, moved or unmounted, or an error in the callback, ends
the observer: `is_alive` turns False and the folder's supervisor takes over.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable

import structlog
from inotify_simple import INotify, flags

from watcher.observers import Observation, Sink
from watcher.scanner import open_folder, stat_at

log = structlog.get_logger(__name__)

# What can change which regular files exist, or their size and mtime. Opens,
# closes and reads are never even queued by the kernel.
MASK = (
    flags.CREATE
    | flags.DELETE
    | flags.MODIFY
    | flags.ATTRIB
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.EXCL_UNLINK
)
_FOLDER_GONE = flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED | flags.UNMOUNT


class InotifyObserver:
    """An inotify watch on one folder's entries, read by the event loop.

    Args:
        sink: gets each read's names with their stats, and the time of the read.
        on_overflow: called when the kernel dropped events (a rescan repairs them).
        read_interval: least seconds between two reads (0: every event at once).
        read_interval_max: the most that wait grows to while changes keep coming.
    """

    def __init__(
        self,
        folder: bytes,
        loop: asyncio.AbstractEventLoop,
        sink: Sink,
        on_overflow: Callable[[], None],
        *,
        read_interval: float = 0.0,
        read_interval_max: float = 0.0,
    ) -> None:
        self._folder = os.path.abspath(folder)
        self._read_interval = read_interval
        self._read_interval_max = max(read_interval, read_interval_max)
        self._wait = read_interval  # before the next read, while changes keep coming
        self._last_found = -math.inf  # loop time of the last read that found events
        self._next_read: asyncio.TimerHandle | None = None
        self._loop = loop
        self._sink = sink
        self._on_overflow = on_overflow
        self._inotify: INotify | None = None
        self._dir_fd: int | None = None

    def start(self) -> None:
        """Start watching (raises OSError if the folder cannot be watched)."""
        dir_fd = open_folder(self._folder)
        try:
            inotify = INotify(nonblocking=True)
            try:
                inotify.add_watch(self._folder, MASK)
            except BaseException:
                inotify.close()
                raise
        except BaseException:
            os.close(dir_fd)
            raise
        self._inotify, self._dir_fd = inotify, dir_fd
        self._loop.add_reader(inotify.fileno(), self._readable)

    def is_alive(self) -> bool:
        """Whether the watch is on."""
        return self._inotify is not None

    async def stop(self) -> None:
        """Stop watching and close both descriptors (idempotent)."""
        self._close()

    def _close(self) -> None:
        inotify, self._inotify = self._inotify, None
        if self._next_read is not None:
            self._next_read.cancel()
            self._next_read = None
        if inotify is not None:
            self._loop.remove_reader(inotify.fileno())
            inotify.close()
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def _readable(self) -> None:
        """The kernel has events: read them at once after a quiet spell, or else once the
        wait since the last read is over."""
        inotify = self._inotify
        due = self._last_found + self._wait
        if inotify is None or self._loop.time() >= due:
            self._read(waited=False)
            return
        self._loop.remove_reader(inotify.fileno())
        self._next_read = self._loop.call_at(due, self._read_again)

    def _read_again(self) -> None:
        """The wait after a read is over: read what the kernel queued meanwhile."""
        self._next_read = None
        self._read(waited=True)

    def _read(self, *, waited: bool) -> None:
        inotify, fd = self._inotify, self._dir_fd
        if inotify is None or fd is None:
            return
        try:
            overflow, gone, found = self._handle(inotify, fd)
        except Exception:
            log.exception("observer_failed")
            self._close()
            return
        if overflow:
            log.warning("inotify_overflow", reason="the kernel's event queue overflowed")
            self._on_overflow()
        if gone:
            log.warning("observer_ended", reason="the folder was deleted, moved or unmounted")
            self._close()
            return
        if self._read_interval <= 0 or not (found or waited):
            return  # the descriptor stays with the loop
        if not found:  # quiet again: the next change is read as soon as it comes
            self._wait = self._read_interval
            self._loop.add_reader(inotify.fileno(), self._readable)
            return
        # After a quiet spell the descriptor stays with the loop, and no timer is set: a
        # change within the wait is put off by `_readable`, a later one is read at once.
        self._last_found = self._loop.time()
        if waited:  # changes kept coming: wait longer, and read again by the timer
            self._wait = min(2 * self._wait, self._read_interval_max)
            self._next_read = self._loop.call_later(self._wait, self._read_again)

    def _handle(self, inotify: INotify, fd: int) -> tuple[bool, bool, bool]:
        """Read what is queued, stat each name once, hand it on.

        Returns (overflow, folder gone, any event read).
        """
        observed = time.time_ns()
        names: dict[bytes, None] = {}  # in order of first mention, each once
        overflow = gone = False
        events = inotify.read(timeout=0)
        for event in events:
            mask = event.mask
            if mask & flags.Q_OVERFLOW:
                overflow = True
            if mask & _FOLDER_GONE:
                gone = True
            if event.name:  # a folder's name too: stat says it is no file
                names[os.fsencode(event.name)] = None
        obs: Observation = [(name, stat_at(fd, name)) for name in names]
        if obs:
            self._sink(obs, observed)
        return overflow, gone, bool(events)
