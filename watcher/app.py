"""The watcher's composition root: folder state, observer, HTTP server, sync stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
import uuid
from typing import Any

import structlog
from aiohttp import web
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Gauge

from common.http_server import make_runner
from common.tasks import Supervisor
from common.tracing import tracer_provider_from_env
from watcher.client import Identity, SyncClient
from watcher.config import WatcherConfig
from watcher.fs_events import FolderObserver, Observation
from watcher.legacy_client import LegacyClient
from watcher.scanner import FolderError, folder_identity, scan_folder, stat_names
from watcher.state import FolderState
from watcher.telemetry import WatcherMetrics

log = structlog.get_logger(__name__)

STOP_WAIT = 5.0
"""Seconds the loops have to end by themselves at a stop (a goodbye takes at most 2)."""


class WatcherError(Exception):
    """The watcher cannot start (folder missing, port taken, ...)."""


class Watcher:
    """One watcher process: watches `config.dir` and reports it to the aggregator."""

    def __init__(
        self,
        config: WatcherConfig,
        registry: CollectorRegistry | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.folder = os.fsencode(os.path.abspath(config.dir))
        self.state = FolderState(resend_buffer=config.resend_buffer)
        self.instance = uuid.uuid4().hex
        self.registry = registry if registry is not None else CollectorRegistry()
        self.http_port = 0
        self._wake = asyncio.Event()
        self._client: SyncClient | LegacyClient | None = None
        self._observer: FolderObserver | None = None
        self._folder_ident: tuple[int, int] | None = None
        self._check_failure: str | None = None  # why the folder is out of reach, if it is
        self.folder_state = "ok"  # ok | missing | unreadable | error
        r = self.registry
        self.metrics = WatcherMetrics(self.registry, tracer)
        r = self.registry
        # Not filewatch_watcher_files: the aggregator exports that name (files per
        # watcher in its index, by node); one name must mean one thing.
        Gauge(
            "filewatch_watcher_folder_files", "Files in the watched folder", registry=r
        ).set_function(lambda: len(self.state.files))
        Gauge("filewatch_watcher_queue_depth", "Changes not yet sent", registry=r).set_function(
            lambda: self.state.pending
        )
        Gauge("filewatch_watcher_sequence", "Last batch sequence", registry=r).set_function(
            lambda: self.state.sequence
        )

    def _on_fs(self, obs: Observation, observed_ns: int) -> None:
        """Runs on the loop (handed over by the observer thread)."""
        self.metrics.fs_events.inc()
        changed = False
        for name, st in obs:
            changed |= self.state.observe(name, st, observed_ns)
        if changed:
            self._wake.set()

    def health(self) -> dict[str, Any]:
        """What /healthz answers: "failing" (HTTP 503), with the reason, while refused."""
        client = self._client
        refusal = client.refusal if client else None
        health: dict[str, Any] = {
            "status": "failing" if refusal else "ok",
            "instance": self.instance,
            "folder": os.fsdecode(self.folder),
            "files": len(self.state.files),
            "seqno": self.state.sequence,
            "stream": client.stream_state.value if client else "starting",
            "folder_state": self.folder_state,
        }
        if refusal:
            health["reason"] = refusal
        return health

    async def _scan(self) -> int:
        """A full scan merged into the state; returns how many names it changed."""
        self.state.begin_scan()
        try:
            scanned = await asyncio.to_thread(scan_folder, self.folder)
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
                fresh = await asyncio.to_thread(stat_names, self.folder, touched)
            finally:
                again = self.state.end_scan()
            self._on_fs([(n, st) for n, st in fresh if n not in again], now)
        if changed:
            self._wake.set()
        return changed

    async def _rescan_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.rescan_interval
        if interval <= 0:
            await stop.wait()
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * random.uniform(0.8, 1.2))
                return
            if self.folder_state != "missing":
                await self._checked_scan()

    def _folder_identity(self) -> tuple[int, int] | FolderError:
        """(device, inode) of the folder, or why it is not usable. Blocking."""
        try:
            return folder_identity(self.folder)
        except FolderError as err:
            return err

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

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Keep the observer alive and follow the folder if it goes, comes back or is replaced."""
        interval = self.config.folder_check_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
                return
            ident = await asyncio.to_thread(self._folder_identity)
            if isinstance(ident, FolderError):
                if ident.state == "missing":
                    if self.folder_state != "missing":
                        self.folder_state = "missing"
                        log.error(
                            "folder_missing", reason=str(ident), files_dropped=len(self.state.files)
                        )
                        if self._observer is not None:
                            await self._observer.stop()
                        self._forget_all()
                elif self._check_failure != str(ident):
                    # There, but out of reach (a parent's permissions, say): not missing,
                    # so its files stay listed, as they do when a rescan cannot read it.
                    self._check_failure = str(ident)
                    self.folder_state = ident.state
                    log.error("folder_check_failed", error=str(ident), folder_state=ident.state)
                continue
            recovered, self._check_failure = self._check_failure is not None, None
            if self.folder_state == "missing" or ident != self._folder_ident or recovered:
                log.warning(
                    "folder_back",
                    replaced=self.folder_state != "missing" and ident != self._folder_ident,
                )
            elif self._observer is not None and not self._observer.is_alive():
                log.error("observer_restarted")
            else:
                continue
            self._folder_ident = ident
            if await self._restart_observer():
                await self._checked_scan()

    async def _checked_scan(self) -> None:
        """A rescan that records the folder's state and counts what it repaired."""
        self.metrics.rescans.inc()
        try:
            changed = await self._scan()
        except OSError as err:
            state = "unreadable" if isinstance(err, PermissionError) else "error"
            if state != self.folder_state:  # one line per change of state, not per tick
                log.error("rescan_failed", error=str(err), folder_state=state)
            self.folder_state = state
            return
        if self.folder_state != "ok":
            log.info("folder_ok", previous=self.folder_state)
        self.folder_state = "ok"
        if changed:
            self.metrics.rescan_changes.inc(changed)
            log.warning("rescan_repaired", changes=changed)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then say goodbye and clean up."""
        cfg = self.config
        try:
            self._folder_ident = await asyncio.to_thread(folder_identity, self.folder)
        except FolderError as err:
            raise WatcherError(f"folder {_shown(cfg.dir)}: {err}") from None
        loop = asyncio.get_running_loop()
        from watcher.http_server import make_app  # noqa: PLC0415 (keeps start-up imports lean)

        runner = make_runner(
            make_app(self.state, self.instance, self.registry, self.health),
            cfg.http_idle_timeout,
        )
        await runner.setup()
        observer = self._observer = FolderObserver(self.folder, loop, self._on_fs)
        running = False  # a start that fails is reported by its error alone
        try:
            site = web.TCPSite(runner, cfg.http_host, cfg.port, reuse_address=True)
            try:
                await site.start()
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno else str(err)
                address = f"{cfg.http_host}:{cfg.port}"
                raise WatcherError(f"cannot listen on {address}: {reason}") from err
            self.http_port = runner.addresses[-1][1]
            host = socket.gethostname()
            identity = Identity(
                node=cfg.name or f"{host}:{self.http_port}",
                epoch=self.instance,
                folder=os.fsdecode(self.folder),
                host=host,
                http_port=self.http_port,
            )
            structlog.contextvars.bind_contextvars(node=identity.node, folder=identity.folder)
            # The observer starts before the scan, so nothing created meanwhile is missed.
            observer.start()
            started = time.perf_counter()
            await self._scan()
            # The legacy protocol numbers the initial scan 1; ours starts at 0.
            self.state.baseline(1 if cfg.protocol == "http" else 0)
            running = True
            log.info(
                "watcher_started",
                files=len(self.state.files),
                scan_seconds=round(time.perf_counter() - started, 3),
                http=f"{cfg.http_host}:{self.http_port}",
                aggregator=cfg.aggregator,
                instance=self.instance,
            )
            client = self._client = self._make_client(identity)
            # Each loop ends by itself once `stop` is set (the client says goodbye
            # first); one that raises is logged and started again, not lost.
            tasks = Supervisor()
            tasks.keep("aggregator-client", lambda: client.run(stop))
            tasks.keep("rescan", lambda: self._rescan_loop(stop))
            tasks.keep("folder-supervisor", lambda: self._supervise(stop))
            try:
                await stop.wait()
            finally:
                await tasks.close(wait=STOP_WAIT)
        finally:
            await observer.stop()
            await runner.cleanup()
            if running:
                log.info("watcher_stopped")

    def _make_client(self, identity: Identity) -> SyncClient | LegacyClient:
        cfg = self.config
        if cfg.protocol == "http":
            return LegacyClient(
                cfg.aggregator,
                self.instance,
                self.http_port,
                self.state,
                self._wake,
                token=cfg.token,
                hello_interval=cfg.hello_interval,
                max_batch=cfg.max_batch,
                reconnect_min=cfg.reconnect_min,
                reconnect_max=cfg.reconnect_max,
                metrics=self.metrics,
            )
        return SyncClient(
            cfg.target,
            identity,
            self.state,
            self._wake,
            token=cfg.token,
            heartbeat_interval=cfg.heartbeat_interval,
            keepalive=cfg.keepalive,
            max_batch=cfg.max_batch,
            batch_delay=cfg.batch_delay,
            chunk_bytes=cfg.chunk_bytes,
            reconnect_min=cfg.reconnect_min,
            reconnect_max=cfg.reconnect_max,
            metrics=self.metrics,
        )


def _shown(path: str, keep: int = 60) -> str:
    """A path for an error message: quoted, its middle elided when very long."""
    if len(path) <= 3 * keep:
        return repr(path)
    return f"{path[:keep]!r}...{path[-keep:]!r} ({len(os.fsencode(path)):,} bytes)"


async def run(config: WatcherConfig) -> None:
    """Run a watcher until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    provider = tracer_provider_from_env("filewatch-watcher", os.environ)
    tracer = provider.get_tracer("filewatch.watcher") if provider else None
    try:
        await Watcher(config, tracer=tracer).run(stop)
    finally:
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)  # flushes pending spans
