"""The aggregator's composition root: builds the parts and owns their lifetime."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import structlog
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from aggregator.config import AggregatorConfig, parse_hostport
from aggregator.errors import StartupError
from aggregator.grpc_server import GrpcServer
from aggregator.http_events import EventStreams
from aggregator.http_gateway import make_app
from aggregator.index import Index
from aggregator.legacy import LegacyIngest
from aggregator.legacy_http import LegacyGuard, ListFetcher
from aggregator.liveness import Liveness
from aggregator.sessions import Sessions
from aggregator.store import Store
from aggregator.telemetry import Metrics
from aggregator.tls import ServerTls, load
from common.http_server import ConnectionLimit, LimitedSite, make_runner
from common.tasks import Supervisor
from common.tracing import tracer_provider_from_env

log = structlog.get_logger(__name__)

__all__ = ["Aggregator", "StartupError", "run"]


class Aggregator:
    """One aggregator: gRPC and HTTP servers over one store, plus the TTL reaper.

    `start()` binds every listener (port 0 allowed; `http_ports` and
    `grpc_port` tell what was bound); `stop()` is graceful, bounded and
    idempotent, and safe before `start()`.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.tracer_provider = tracer_provider
        self.tracer = (
            tracer_provider.get_tracer("filewatch.aggregator") if tracer_provider else None
        )
        self.index = Index(
            max_files_per_watcher=config.max_files_per_watcher, first_version=time.time_ns() // 1000
        )
        self.store = Store(
            self.index,
            self.metrics,
            max_readers=config.max_readers,
            reader_queue=config.reader_queue,
            tracer=self.tracer,
        )
        self.liveness = Liveness(config.ttl)
        self.sync = Sessions(self.store, self.liveness, max_watchers=config.max_watchers)
        self.events = EventStreams(
            self.store,
            max_clients=config.max_event_clients,
            write_timeout=config.reader_write_timeout,
        )
        self._grpc = GrpcServer(config, self.sync, self.store, tracer_provider)
        self._session: aiohttp.ClientSession | None = None
        self.legacy: LegacyIngest | None = None
        self.http_ports: list[int] = []
        self.grpc_port = 0
        self._runner: web.AppRunner | None = None
        self._http_limit: ConnectionLimit | None = None
        # The parent of every background task: the reaper, the legacy ticker, fetches.
        self._tasks = Supervisor()
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        """Bind and serve; returns once every listener is up."""
        cfg = self.config
        # Read once, here: the files are not watched; new ones need a restart.
        tls: ServerTls | None = (
            load(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert else None
        )
        self.grpc_port = await self._grpc.start(tls)

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, force_close=True), auto_decompress=True
        )
        fetcher = ListFetcher(
            self._session, cfg.fetch_timeout, cfg.max_list_bytes, cfg.max_fetches, self.metrics
        )
        self.legacy = LegacyIngest(
            self.store,
            self.liveness,
            fetcher,
            self._tasks,
            max_watchers=cfg.max_watchers,
            gap_wait=cfg.gap_wait,
            max_seqno_ahead=cfg.max_seqno_ahead,
            hello_period=cfg.legacy_hello_period,
            missed_hellos=cfg.legacy_missed_hellos,
        )
        legacy, tick = self.legacy, min(0.1, cfg.gap_wait / 2)
        self._tasks.keep("legacy-ticker", lambda: legacy.run(tick))
        guard = LegacyGuard(cfg.token, cfg.legacy_networks)
        app = make_app(
            self.store,
            self.metrics,
            legacy=(self.legacy, guard),
            client_max_size=cfg.max_body_bytes,
            tracer=self.tracer,
            liveness=self.liveness,
            events=self.events,
        )
        self._runner = make_runner(app, cfg.http_idle_timeout)
        await self._runner.setup()
        self._http_limit = ConnectionLimit(
            self._runner, cfg.max_connections, self.metrics.http_connections_refused.inc
        )
        for address in cfg.http:
            host, port = parse_hostport(address)
            site = LimitedSite(
                self._runner,
                host,
                port,
                self._http_limit,
                ssl_context=tls.http if tls else None,
                ssl_handshake_timeout=cfg.http_idle_timeout,
            )
            try:
                await site.start()
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno else str(err)
                raise StartupError(f"cannot listen on {address} (HTTP): {reason}") from err
            self.http_ports.append(self._runner.addresses[-1][1])
        self._tasks.keep("ttl-reaper", self._reap)
        grpc_host = parse_hostport(cfg.grpc)[0]
        self._started = True
        log.info(
            "aggregator_started",
            http=[
                f"{parse_hostport(a)[0]}:{p}"
                for a, p in zip(cfg.http, self.http_ports, strict=True)
            ],
            grpc=f"{grpc_host}:{self.grpc_port}",
            ttl=cfg.ttl,
            tls=tls.mode if tls else "off",
        )

    async def _reap(self) -> None:
        """Remove the files of watchers whose TTL ran out."""
        period = min(1.0, self.config.ttl / 4)
        while True:
            await asyncio.sleep(period)
            for node in self.liveness.expired(time.monotonic()):
                removed = self.store.remove_watcher(node)
                self.metrics.watchers_expired.inc()
                self.sync.expired(node)
                if self.legacy is not None:
                    self.legacy.expired(node)
                log.info("watcher_expired", node=node, files_removed=removed)

    async def stop(self) -> None:
        """Graceful, bounded shutdown: health, streams, gRPC, HTTP."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:  # a start that failed is reported by its error alone
            log.info("aggregator_stopping", grace=self.config.grace)
        # Every step runs, whatever the one before it raised.
        for step in (
            self._grpc.enter_graceful_shutdown,
            self._end_streams,
            self._tasks.close,
            self._stop_grpc,
            self._stop_http,
            self._close_session,
            self._flush_traces,
        ):
            try:
                await step()
            except Exception:
                log.exception("stop_step_failed", step=step.__name__)
        if self._started:
            log.info("aggregator_stopped")

    async def _end_streams(self) -> None:
        self.sync.shutdown()
        self.events.close("aggregator shutting down")
        self.store.close_readers("aggregator shutting down")

    async def _stop_grpc(self) -> None:
        if self._started or self.grpc_port:
            await self._grpc.stop()

    async def _stop_http(self) -> None:
        if self._runner is not None:
            await asyncio.wait_for(self._runner.cleanup(), timeout=self.config.grace + 1)
        if self._http_limit is not None:
            self._http_limit.close()

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _flush_traces(self) -> None:
        if self.tracer_provider is not None:
            await asyncio.to_thread(self.tracer_provider.shutdown)  # flushes pending spans


async def run(config: AggregatorConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    aggregator = Aggregator(
        config, tracer_provider=tracer_provider_from_env("filewatch-aggregator", os.environ)
    )
    try:
        await aggregator.start()
        await stop.wait()
    finally:
        await aggregator.stop()
