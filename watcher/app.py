"""The watcher's composition root: folder state and watch, HTTP server, client, their loops."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import uuid
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import structlog
from aiohttp import web
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Gauge

from common.http_server import make_runner
from common.tasks import Supervisor
from common.tracing import tracer_provider_from_env
from watcher.client import Identity, SyncClient
from watcher.config import WatcherConfig
from watcher.errors import FolderError, StartupError
from watcher.folder import FolderWatch
from watcher.legacy_client import LegacyClient
from watcher.link import Client, Wakeup
from watcher.state import FolderState
from watcher.telemetry import WatcherMetrics

log = structlog.get_logger(__name__)

STOP_WAIT = 5.0
"""Seconds the loops have to end by themselves at a stop (a goodbye takes at most 2)."""


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
        self._wakeup = Wakeup()
        self._clients: list[Client] = []
        self.metrics = WatcherMetrics(self.registry, tracer)
        secure = any(urlsplit(url).scheme == "grpcs" for url in config.targets)
        self._credentials = channel_credentials(config) if secure else None
        self.folder_watch = FolderWatch(
            self.folder,
            self.state,
            self._wakeup,
            self.metrics,
            rescan_interval=config.rescan_interval,
            check_interval=config.folder_check_interval,
            observer=config.observer,
            read_interval=config.batch_interval,
            read_interval_max=config.batch_interval_max,
        )
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

    def health(self) -> dict[str, Any]:
        """What /healthz answers: "failing" (HTTP 503), with the reason, while an aggregator
        refuses this watcher. "stream" is "live" once every target's is; "targets" has each."""
        clients = self._clients
        refusals = [c.refusal for c in clients if c.refusal]
        if len(clients) > 1:  # which target refuses, when there are several
            refusals = [f"{c.target}: {c.refusal}" for c in clients if c.refusal]
        states = [c.stream_state.value for c in clients]
        health: dict[str, Any] = {
            "status": "failing" if refusals else "ok",
            "instance": self.instance,
            "folder": os.fsdecode(self.folder),
            "files": len(self.state.files),
            "seqno": self.state.sequence,
            "stream": next((s for s in states if s != "live"), "live") if clients else "starting",
            "folder_state": self.folder_watch.status.value,
            "targets": [
                {"target": c.target, "stream": c.stream_state.value, "refusal": c.refusal}
                for c in clients
            ],
        }
        if refusals:
            health["reason"] = "; ".join(refusals)
        return health

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then say goodbye and clean up."""
        cfg = self.config
        try:
            await self.folder_watch.check()
        except FolderError as err:
            raise StartupError(f"folder {_shown(cfg.dir)}: {err}") from None
        from watcher.http_server import make_app  # noqa: PLC0415 (keeps start-up imports lean)

        runner = make_runner(
            make_app(self.state, self.instance, self.registry, self.health),
            cfg.http_idle_timeout,
        )
        await runner.setup()
        running = False  # a start that fails is reported by its error alone
        try:
            site = web.TCPSite(runner, cfg.http_host, cfg.port, reuse_address=True)
            try:
                await site.start()
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno else str(err)
                address = f"{cfg.http_host}:{cfg.port}"
                raise StartupError(f"cannot listen on {address}: {reason}") from err
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
            scan_seconds = await self.folder_watch.start()
            # The legacy protocol numbers the initial scan 1; ours starts at 0.
            self.state.baseline(1 if cfg.protocol == "http" else 0)
            running = True
            log.info(
                "watcher_started",
                files=len(self.state.files),
                scan_seconds=round(scan_seconds, 3),
                http=f"{cfg.http_host}:{self.http_port}",
                aggregator=",".join(cfg.targets),
                instance=self.instance,
            )
            self._clients = self._make_clients(identity)
            # Each loop ends by itself once `stop` is set (a client says goodbye
            # first); one that raises is logged and started again, not lost.
            tasks = Supervisor()
            for client in self._clients:
                tasks.keep(f"aggregator-client {client.target}", partial(client.run, stop))
            tasks.keep("rescan", lambda: self.folder_watch.rescan_loop(stop))
            tasks.keep("folder-supervisor", lambda: self.folder_watch.supervise(stop))
            try:
                await stop.wait()
            finally:
                await tasks.close(wait=STOP_WAIT)
        finally:
            await self.folder_watch.close()
            await runner.cleanup()
            if running:
                log.info("watcher_stopped")

    def _make_clients(self, identity: Identity) -> list[Client]:
        """One client per -aggregator target, each with its own wake-up event."""
        cfg = self.config
        if cfg.protocol == "http":
            legacy = LegacyClient(
                cfg.targets[0],
                self.instance,
                self.http_port,
                self.state,
                self._wakeup.subscribe(),
                token=cfg.token,
                hello_interval=cfg.hello_interval,
                max_batch=cfg.max_batch,
                reconnect_min=cfg.reconnect_min,
                reconnect_max=cfg.reconnect_max,
                metrics=self.metrics,
            )
            return [legacy]
        return [self._sync_client(url, identity) for url in cfg.targets]

    def _sync_client(self, url: str, identity: Identity) -> SyncClient:
        cfg = self.config
        return SyncClient(
            url,
            identity,
            self.state,
            self._wakeup.subscribe(),
            token=cfg.token,
            heartbeat_interval=cfg.heartbeat_interval,
            keepalive=cfg.keepalive,
            max_batch=cfg.max_batch,
            batch_delay=cfg.batch_delay,
            batch_interval=cfg.batch_interval,
            chunk_bytes=cfg.chunk_bytes,
            reconnect_min=cfg.reconnect_min,
            reconnect_max=cfg.reconnect_max,
            metrics=self.metrics,
            credentials=self._credentials if urlsplit(url).scheme == "grpcs" else None,
        )


def channel_credentials(config: WatcherConfig) -> grpc.ChannelCredentials:
    """TLS credentials for grpcs:// targets from --tls-ca/--tls-cert/--tls-key, read and
    checked once at start-up: StartupError names a file that is unreadable or not PEM."""
    pem: dict[str, bytes | None] = {}
    for flag, path in (
        ("--tls-ca", config.tls_ca),
        ("--tls-cert", config.tls_cert),
        ("--tls-key", config.tls_key),
    ):
        try:
            pem[flag] = Path(path).read_bytes() if path else None
        except OSError as err:
            raise StartupError(f"{flag} {_shown(path)}: {err.strerror}") from None
    # gRPC reads the PEM only at the first connection; ssl says now what is wrong.
    ca = pem["--tls-ca"]
    if ca is not None:
        try:
            ssl.create_default_context(cadata=ca.decode(errors="replace"))
        except ssl.SSLError as err:
            raise StartupError(
                f"--tls-ca {_shown(config.tls_ca)}: not a PEM certificate ({err.reason})"
            ) from None
    if config.tls_cert:
        try:
            ssl.create_default_context().load_cert_chain(config.tls_cert, config.tls_key)
        except ssl.SSLError as err:
            raise StartupError(
                f"--tls-cert/--tls-key: not a PEM certificate and its key ({err.reason})"
            ) from None
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pem["--tls-key"],
        certificate_chain=pem["--tls-cert"],
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
