"""The aggregator's gRPC server: Sync, FileIndex, health and reflection on one port."""

from __future__ import annotations

import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import method_name
from opentelemetry.sdk.trace import TracerProvider

from aggregator.config import AggregatorConfig, parse_hostport
from aggregator.errors import StartupError
from aggregator.grpc_read import FileIndexService, add_file_index
from aggregator.grpc_sync import SyncService
from aggregator.sessions import Sessions
from aggregator.store import Store
from aggregator.tls import ServerTls, grpc_credentials
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["WatcherSync"].full_name,
    pb.DESCRIPTOR.services_by_name["FileIndex"].full_name,
)


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


class GrpcServer:
    """The gRPC side of one aggregator, over its sessions and store."""

    def __init__(
        self,
        config: AggregatorConfig,
        sessions: Sessions,
        store: Store,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._config = config
        keepalive_ms = int(config.keepalive * 1000)
        interceptors = []
        if tracer_provider is not None:
            # Unary calls only: no span may last a whole Sync or WatchFiles stream.
            interceptors.append(
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    tracer_provider, filter_=method_name("ListFiles")
                )
            )
        self._server = server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
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
        sync = SyncService(
            sessions, store.metrics, token=config.token, hello_timeout=config.hello_timeout
        )
        pb_grpc.add_WatcherSyncServicer_to_server(sync, server)
        readers = FileIndexService(store, write_timeout=config.reader_write_timeout)
        add_file_index(readers, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def start(self, tls: ServerTls | None = None) -> int:
        """Bind `--grpc` and serve (TLS only, if `tls`); returns the bound port.

        StartupError if the address is taken.
        """
        address = self._config.grpc
        check_free(address)
        try:
            if tls is None:
                port: int = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, grpc_credentials(tls))
        except RuntimeError as err:  # grpc says only "Failed to bind"
            raise StartupError(f"cannot listen on {address} (gRPC): {err}") from err
        await self._server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    async def enter_graceful_shutdown(self) -> None:
        """Health says NOT_SERVING from now on: load balancers stop sending."""
        await self._health.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Stop, giving open calls `--grace` seconds."""
        await self._server.stop(self._config.grace)
