"""The aggregator's configuration: one frozen dataclass built from argv and env."""

from __future__ import annotations

import argparse
import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from common.flags import (
    CREDENTIAL_FILE_HELP,
    CREDENTIAL_HELP,
    ENV_PREFIX,
    add_config_flag,
    resolve_token,
)

DEFAULT_HTTP = ("127.0.0.1:8000", "127.0.0.1:12345")


def parse_hostport(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets); port 0 asks for any free port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host.strip("[]"), number


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything `python -m aggregator` can be told."""

    http: tuple[str, ...] = DEFAULT_HTTP
    """HTTP listen addresses (JSON read API, legacy ingestion, /metrics, /healthz)."""
    grpc: str = "127.0.0.1:50051"
    """gRPC listen address (Sync, FileIndex, health, reflection)."""
    ttl: float = 15.0
    """Seconds a vanished watcher's files are kept before they are removed."""
    token: str = ""
    """Shared token required for ingestion; empty: none."""
    token_file: str = ""
    """File the token was read from (from_args puts its content in `token`)."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_format: str = "auto"
    """kv, json, or auto (json when stdout is not a terminal)."""
    max_watchers: int = 10_000
    """Watchers held at once."""
    max_files_per_watcher: int = 5_000_000
    """Files one watcher may report."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted."""
    max_readers: int = 1_000
    """WatchFiles readers at once."""
    reader_queue: int = 10_000
    """Events buffered per reader (WatchFiles, /files/events) before it is dropped as slow."""
    reader_write_timeout: float = 5.0
    """Seconds a WatchFiles message (or /files/events event) may wait to be sent before its
    reader is dropped as slow."""
    max_event_clients: int = 1_000
    """GET /files/events clients at once (apart from --max-readers); one more gets a 429."""
    hello_timeout: float = 10.0
    """Seconds a new Sync stream has to say hello."""
    keepalive: float = 10.0
    """Seconds between gRPC keepalive pings; a peer silent for 2x this is dropped."""
    grace: float = 5.0
    """Seconds of graceful shutdown before open calls are cancelled."""
    legacy_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """Networks whose legacy (Go watcher) requests are accepted without a token."""
    fetch_timeout: float = 5.0
    """Seconds to fetch a legacy watcher's list."""
    gap_wait: float = 1.0
    """Seconds to wait for a missing legacy seqno before refetching the list."""
    max_body_bytes: int = 1024 * 1024
    """Largest legacy request body accepted (413 beyond)."""
    max_list_bytes: int = 64 * 1024 * 1024
    """Largest legacy watcher list fetched (about 1.5 million names of 20 characters)."""
    max_fetches: int = 4
    """Legacy list fetches in flight at once: their bodies take at most this x max_list_bytes."""
    max_seqno_ahead: int = 1_000_000
    """A legacy PATCH numbered more than this beyond the last applied seqno is refused."""
    legacy_hello_period: float = 5.0
    """Seconds between a legacy watcher's hellos (the Go watcher's: 5)."""
    legacy_missed_hellos: float = 3.0
    """Hello periods without a hello before a legacy watcher is removed (or the TTL, if longer)."""
    http_idle_timeout: float = 15.0
    """Seconds an HTTP connection may stay without a complete request: idle keep-alive, or
    request line and headers not all received yet (a response in progress is not cut)."""
    max_connections: int = 1024
    """HTTP connections open at once, all listeners together; one more is closed at once."""
    tls_cert: str = ""
    """PEM certificate chain served on the gRPC port and every HTTP listener; empty: plaintext."""
    tls_key: str = ""
    """PEM private key of `tls_cert` (both or neither)."""
    tls_client_ca: str = ""
    """PEM CA certificates a client certificate must chain to (mTLS); empty: none asked."""

    def __post_init__(self) -> None:
        for name in (
            "ttl", "hello_timeout", "keepalive", "grace", "fetch_timeout", "gap_wait",
            "http_idle_timeout",
        ):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number")
        for address in (*self.http, self.grpc):
            parse_hostport(address)
        if not self.http:
            raise ValueError("at least one --http address is needed")
        if self.ttl <= 0:
            raise ValueError("--ttl must be positive")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"unknown --log-level {self.log_level!r}")
        if self.log_format not in ("kv", "json", "auto"):
            raise ValueError(f"unknown --log-format {self.log_format!r}")
        for name in ("max_watchers", "max_files_per_watcher", "max_message_bytes", "max_readers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.max_event_clients <= 0:
            raise ValueError("--max-event-clients must be positive")
        if not (math.isfinite(self.reader_write_timeout) and self.reader_write_timeout > 0):
            raise ValueError("--reader-write-timeout must be a positive number")
        if self.reader_queue <= 0 or self.hello_timeout <= 0 or self.keepalive <= 0:
            raise ValueError("queue sizes and timeouts must be positive")
        if self.grace < 0:
            raise ValueError("--grace must not be negative")
        for net in self.legacy_networks:
            ipaddress.ip_network(net, strict=False)  # raises ValueError
        if min(self.fetch_timeout, self.gap_wait) <= 0:
            raise ValueError("--fetch-timeout and --gap-wait must be positive")
        if min(self.max_body_bytes, self.max_list_bytes) <= 0:
            raise ValueError("--max-body-bytes and --max-list-bytes must be positive")
        if min(self.max_fetches, self.max_seqno_ahead) <= 0:
            raise ValueError("--max-fetches and --max-seqno-ahead must be positive")
        if not (math.isfinite(self.legacy_missed_hellos) and self.legacy_missed_hellos >= 1):
            raise ValueError("--legacy-missed-hellos must be at least 1")
        if not (math.isfinite(self.legacy_hello_period) and self.legacy_hello_period > 0):
            raise ValueError("--legacy-hello-period must be a positive number")
        if self.http_idle_timeout <= 0 or self.max_connections <= 0:
            raise ValueError("--http-idle-timeout and --max-connections must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line, with every flag's default taken from its env twin."""
    d = AggregatorConfig()
    p = argparse.ArgumentParser(
        prog="filewatch-aggregator",
        description="filewatch aggregator: one sorted list of every file of every watcher.",
        allow_abbrev=False,
    )

    def opt(flag: str, *, help: str, **kw: Any) -> None:
        add_config_flag(p, env, d, flag, help=help, **kw)

    env_http = env.get(ENV_PREFIX + "HTTP")
    p.add_argument(
        "--http",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="HTTP listen address, repeatable; replaces the defaults "
        f"(env {ENV_PREFIX}HTTP, comma-separated; default: {','.join(DEFAULT_HTTP)})",
    )
    p.set_defaults(env_http=env_http)
    opt("--grpc", help="gRPC listen address HOST:PORT", metavar="HOST:PORT")
    opt("--ttl", help="seconds a vanished watcher's files are kept")
    opt("--token", help=CREDENTIAL_HELP)
    opt("--token-file", help=CREDENTIAL_FILE_HELP, metavar="PATH")
    opt("--log-level", help="debug|info|warning|error")
    opt("--log-format", help="kv|json|auto")
    opt("--max-watchers", help="watchers held at once")
    opt("--max-files-per-watcher", help="files one watcher may report")
    opt("--max-message-bytes", help="largest gRPC message accepted")
    opt("--max-readers", help="WatchFiles readers at once")
    opt(
        "--reader-queue",
        help="events buffered per reader (WatchFiles, /files/events) before it is dropped",
    )
    opt(
        "--reader-write-timeout",
        help="seconds a WatchFiles message (or /files/events event) may wait to be sent (the "
        "reader does not read) before the reader is dropped (RESOURCE_EXHAUSTED, event: dropped)",
    )
    opt("--max-event-clients", help="GET /files/events clients at once; one more gets a 429")
    opt("--hello-timeout", help="seconds a Sync stream has to say hello")
    opt("--keepalive", help="seconds between gRPC keepalive pings")
    opt("--grace", help="seconds of graceful shutdown")
    opt(
        "--legacy-networks",
        help="comma-separated networks whose legacy requests need no token",
        default=",".join(d.legacy_networks),
    )
    opt("--fetch-timeout", help="seconds to fetch a legacy list")
    opt("--gap-wait", help="seconds to wait for a missing legacy seqno")
    opt("--max-body-bytes", help="largest legacy request body")
    opt("--max-list-bytes", help="largest legacy watcher list fetched")
    opt("--max-fetches", help="legacy list fetches in flight at once")
    opt("--max-seqno-ahead", help="legacy seqnos further than this beyond the applied are refused")
    opt("--legacy-hello-period", help="seconds between a legacy watcher's hellos (Go's: 5)")
    opt(
        "--legacy-missed-hellos",
        help="hello periods without a hello before a legacy watcher goes (or --ttl if longer)",
    )
    opt(
        "--http-idle-timeout",
        help="seconds an HTTP connection may stay without a complete request (idle keep-alive, "
        "or headers still unsent), then it is closed; a response in progress is not cut",
    )
    opt(
        "--max-connections",
        help="HTTP connections open at once, all listeners together; beyond, a new one is "
        "closed at once (counted in filewatch_http_connections_refused_total)",
    )
    opt(
        "--tls-cert",
        help="PEM certificate chain: the gRPC port and every HTTP listener serve TLS only "
        "(with --tls-key; default: plaintext)",
        metavar="PATH",
    )
    opt("--tls-key", help="PEM private key of --tls-cert (unencrypted)", metavar="PATH")
    opt(
        "--tls-client-ca",
        help="PEM CA certificates: clients must present a certificate they signed (mTLS, on "
        "gRPC and HTTP); needs --tls-cert",
        metavar="PATH",
    )
    return p


def from_args(argv: Sequence[str], env: Mapping[str, str]) -> AggregatorConfig:
    """Build the config from a command line and an environment (both injected)."""
    ns = build_parser(env).parse_args(list(argv))
    if ns.http:
        http = tuple(ns.http)
    elif ns.env_http:
        http = tuple(a.strip() for a in ns.env_http.split(",") if a.strip())
    else:
        http = DEFAULT_HTTP
    networks = tuple(n.strip() for n in ns.legacy_networks.split(",") if n.strip())
    plain = {f.name: getattr(ns, f.name) for f in fields(AggregatorConfig)}
    token = resolve_token(ns.token, ns.token_file)
    return AggregatorConfig(**(plain | {"http": http, "legacy_networks": networks, "token": token}))
