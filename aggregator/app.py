"""The aggregator's composition root: builds the parts and owns their lifetime."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp
import grpc
import structlog
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import method_name
from opentelemetry.sdk.trace import TracerProvider

from aggregator.config import AggregatorConfig, parse_hostport
from aggregator.grpc_service import FileIndexService, SyncService
from aggregator.http_gateway import make_app
from aggregator.index import Index
from aggregator.legacy import LegacyIngest
from aggregator.legacy_http import LegacyGuard, ListFetcher
from aggregator.liveness import Liveness
from aggregator.store import Store
from aggregator.telemetry import Metrics
from common.http_server import ConnectionLimit, LimitedSite, make_runner
from common.tasks import Supervisor
from common.tracing import tracer_provider_from_env
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["WatcherSync"].full_name,
    pb.DESCRIPTOR.services_by_name["FileIndex"].full_name,
)


class StartupError(Exception):
    """The aggregator cannot start: a listen address is taken or cannot be had."""


def check_free(address: str) -> None:
    """Raise StartupError if HOST:PORT cannot be bound now (a clear reason before gRPC's own).

    gRPC reports a taken port only as "Failed to bind", after logging its own
    error line; this says why, in one line, and first.
    """
    host, port = parse_hostport(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise StartupError(f"cannot listen on {address}: {err.strerror}") from err
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as err:
            raise StartupError(f"cannot listen on {address} (gRPC): {err.strerror}") from err


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
        self.index = Index(max_files_per_watcher=config.max_files_per_watcher)
        self.store = Store(
            self.index,
            self.metrics,
            max_readers=config.max_readers,
            reader_queue=config.reader_queue,
            tracer=self.tracer,
        )
        self.liveness = Liveness(config.ttl)
        self.sync = SyncService(
            self.store,
            self.liveness,
            token=config.token,
            max_watchers=config.max_watchers,
            hello_timeout=config.hello_timeout,
        )
        self._session: aiohttp.ClientSession | None = None
        self.legacy: LegacyIngest | None = None
        self.http_ports: list[int] = []
        self.grpc_port = 0
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._http_limit: ConnectionLimit | None = None
        # The parent of every background task: the reaper, the legacy ticker, fetches.
        self._tasks = Supervisor()
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        """Bind and serve; returns once every listener is up."""
        cfg = self.config
        keepalive_ms = int(cfg.keepalive * 1000)
        interceptors = []
        if self.tracer_provider is not None:
            # Unary calls only: no span may last a whole Sync or WatchFiles stream.
            interceptors.append(
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    self.tracer_provider, filter_=method_name("ListFiles")
                )
            )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                # A second aggregator on the same port must fail, not share it.
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", keepalive_ms),
                # A keepalive ping that finds another ping in flight waits for that
                # one, whose timeout is this (default 60 s): half-open links would
                # go unnoticed for a minute.
                ("grpc.http2.ping_timeout_ms", keepalive_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
                # Watchers ping every --keepalive seconds; allow down to 1 s.
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ],
        )
        self._server = server
        pb_grpc.add_WatcherSyncServicer_to_server(self.sync, server)
        readers = FileIndexService(self.store, write_timeout=cfg.reader_write_timeout)
        pb_grpc.add_FileIndexServicer_to_server(readers, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        check_free(cfg.grpc)
        try:
            self.grpc_port = server.add_insecure_port(cfg.grpc)
        except RuntimeError as err:  # grpc says only "Failed to bind"
            raise StartupError(f"cannot listen on {cfg.grpc} (gRPC): {err}") from err
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

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
        )
        self._runner = make_runner(app, cfg.http_idle_timeout)
        await self._runner.setup()
        self._http_limit = ConnectionLimit(
            self._runner, cfg.max_connections, self.metrics.http_connections_refused.inc
        )
        for address in cfg.http:
            host, port = parse_hostport(address)
            site = LimitedSite(self._runner, host, port, self._http_limit)
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
            self._health.enter_graceful_shutdown,
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
        self.store.close_readers("aggregator shutting down")

    async def _stop_grpc(self) -> None:
        if self._server is not None:
            await self._server.stop(self.config.grace)

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
