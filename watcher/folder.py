"""Following the watched folder: observer, scans merged into the state, rescans, supervision.

The observer reports each change as it happens; a scan (at start, and every
rescan interval) repairs whatever it missed. A scan races the events that
arrive meanwhile: the names they touch are left to them, then asked again.
The supervisor checks the folder's identity and follows it if it goes, comes
back, is replaced or becomes unreadable, and restarts an observer that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time

import structlog

from watcher.errors import FolderError
from watcher.link import Wakeup
from watcher.observers import Observation, Observer, make_observer
from watcher.scanner import folder_identity, scan_folder, stat_names
from watcher.state import FolderState
from watcher.telemetry import WatcherMetrics

log = structlog.get_logger(__name__)


class FolderStatus(enum.Enum):
    """How the folder stands: /healthz's "folder_state"."""

    OK = "ok"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    ERROR = "error"


class FolderWatch:
    """Keeps `state` equal to the folder at `path`, and says how the folder stands.

    Args:
        wake: told whenever the state has new changes.
        rescan_interval: seconds between rescans (jittered); 0 for none.
        check_interval: seconds between checks of the folder's identity.
        observer: which observer follows the folder (`watcher.observers.KINDS`).
        read_interval: least seconds between two reads of the folder's events while
            they keep coming (the batch interval: a batch cannot leave sooner).
        read_interval_max: the most that interval grows to while each read finds more.
    """

    def __init__(
        self,
        path: bytes,
        state: FolderState,
        wake: Wakeup,
        metrics: WatcherMetrics,
        *,
        rescan_interval: float,
        check_interval: float,
        observer: str = "auto",
        read_interval: float = 0.0,
        read_interval_max: float = 0.0,
    ) -> None:
        self.path = path
        self.state = state
        self.status = FolderStatus.OK
        self._wake = wake
        self.metrics = metrics
        self._rescan_interval = rescan_interval
        self._check_interval = check_interval
        self._observer_kind = observer
        self._read_interval = read_interval
        self._read_interval_max = read_interval_max
        self._observer: Observer | None = None
        self._rescan_now = asyncio.Event()  # the kernel dropped events: rescan at once
        self._ident: tuple[int, int] | None = None
        self._check_failure: str | None = None  # why the folder is out of reach, if it is

    async def check(self) -> None:
        """Note the folder's identity; raises FolderError if it is not a usable folder."""
        self._ident = await asyncio.to_thread(folder_identity, self.path)

    async def start(self) -> float:
        """Start the observer, then scan: nothing created meanwhile is missed.

        Returns the seconds the scan took.
        """
        self._observer = make_observer(
            self._observer_kind,
            self.path,
            asyncio.get_running_loop(),
            self.observe,
            self._rescan_now.set,
            read_interval=self._read_interval,
            read_interval_max=self._read_interval_max,
        )
        self._observer.start()
        started = time.perf_counter()
        await self._scan()
        return time.perf_counter() - started

    async def close(self) -> None:
        """Stop the observer."""
        if self._observer is not None:
            await self._observer.stop()

    def observe(self, obs: Observation, observed_ns: int) -> None:
        """Runs on the loop (handed over by the observer thread)."""
        self.metrics.fs_events.inc()
        changed = False
        for name, st in obs:
            changed |= self.state.observe(name, st, observed_ns)
        if changed:
            self._wake.set()

    async def _scan(self) -> int:
        """A full scan merged into the state; returns how many names it changed."""
        self.state.begin_scan()
        try:
            scanned = await asyncio.to_thread(scan_folder, self.path)
        except OSError:
            self.state.finish_scan(dict(self.state.files), time.time_ns())
            raise
        now = time.time_ns()
        changed, touched = self.state.finish_scan(scanned, now)
        if touched:  # events raced the scan: ask the file system again
            # Events can race this second look too: a name they touch meanwhile
            # is left to them, as their stat may be newer than ours.
            self.state.begin_scan()
            try:
                fresh = await asyncio.to_thread(stat_names, self.path, touched)
            finally:
                again = self.state.end_scan()
            self.observe([(n, st) for n, st in fresh if n not in again], now)
        if changed:
            self._wake.set()
        return changed

    async def _checked_scan(self) -> None:
        """A rescan that records the folder's status and counts what it repaired."""
        self.metrics.rescans.inc()
        try:
            changed = await self._scan()
        except OSError as err:
            status = (
                FolderStatus.UNREADABLE if isinstance(err, PermissionError) else FolderStatus.ERROR
            )
            if status is not self.status:  # one line per change of status, not per tick
                log.error("rescan_failed", error=str(err), folder_state=status.value)
            self.status = status
            return
        if self.status is not FolderStatus.OK:
            log.info("folder_ok", previous=self.status.value)
        self.status = FolderStatus.OK
        if changed:
            self.metrics.rescan_changes.inc(changed)
            log.warning("rescan_repaired", changes=changed)

    async def rescan_loop(self, stop: asyncio.Event) -> None:
        """Rescan every interval (jittered by 20%), and at once when the observer lost
        events, until `stop`; not while the folder is missing."""
        interval = self._rescan_interval
        while not stop.is_set():
            wait = interval * random.uniform(0.8, 1.2) if interval > 0 else None
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, self._rescan_now)]
            try:
                await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
            if stop.is_set():
                return
            self._rescan_now.clear()
            if self.status is not FolderStatus.MISSING:
                await self._checked_scan()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Keep the observer alive and follow the folder if it goes, comes back or is replaced."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._check_interval)
                return
            ident = await asyncio.to_thread(self._identity)
            if isinstance(ident, FolderError):
                await self._unusable(ident)
            else:
                await self._usable(ident)

    def _identity(self) -> tuple[int, int] | FolderError:
        """(device, inode) of the folder, or why it is not usable. Blocking."""
        try:
            return folder_identity(self.path)
        except FolderError as err:
            return err

    async def _unusable(self, err: FolderError) -> None:
        status = FolderStatus(err.state)
        if status is FolderStatus.MISSING:
            if self.status is not FolderStatus.MISSING:
                self.status = FolderStatus.MISSING
                log.error("folder_missing", reason=str(err), files_dropped=len(self.state.files))
                if self._observer is not None:
                    await self._observer.stop()
                self._forget_all()
        elif self._check_failure != str(err):
            # There, but out of reach (a parent's permissions, say): not missing,
            # so its files stay listed, as they do when a rescan cannot read it.
            self._check_failure = str(err)
            self.status = status
            log.error("folder_check_failed", error=str(err), folder_state=status.value)

    async def _usable(self, ident: tuple[int, int]) -> None:
        recovered, self._check_failure = self._check_failure is not None, None
        missing = self.status is FolderStatus.MISSING
        if missing or ident != self._ident or recovered:
            log.warning("folder_back", replaced=not missing and ident != self._ident)
        elif self._observer is not None and not self._observer.is_alive():
            log.error("observer_restarted")
        else:
            return
        self._ident = ident
        if await self._restart_observer():
            await self._checked_scan()

    def _forget_all(self) -> None:
        """The folder is gone, and so are its files."""
        now = time.time_ns()
        for name in list(self.state.files):
            self.state.observe(name, None, now)
        self._wake.set()

    async def _restart_observer(self) -> bool:
        observer = self._observer
        if observer is None:
            return False
        await observer.stop()
        try:
            observer.start()
        except OSError as err:
            log.error("observer_start_failed", error=str(err))
            return False
        return True
