"""The watcher's configuration: the original Go watcher's flags, plus long forms and env twins."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from common.flags import CREDENTIAL_FILE_HELP, CREDENTIAL_HELP, add_config_flag, resolve_token
from watcher.observers import KINDS

SCHEMES = ("grpc", "grpcs", "http")


@dataclass(frozen=True)
class WatcherConfig:
    """Everything `python -m watcher` can be told."""

    dir: str = "."
    """The folder to watch."""
    port: int = 4000
    """This watcher's HTTP port (GET /files, /healthz, /metrics); 0 picks a free one."""
    aggregator: str = "grpc://127.0.0.1:50051"
    """Where to report: grpc://HOST:PORT (streaming; grpcs:// over TLS), several of them
    comma-separated (one independent stream to each), or one http://HOST:PORT (legacy)."""
    tls_ca: str = ""
    """PEM file of the CA that signs grpcs:// aggregators' certificates (default: the
    system's roots)."""
    tls_cert: str = ""
    """PEM certificate chain this watcher shows a grpcs:// aggregator that asks (mTLS)."""
    tls_key: str = ""
    """PEM private key of --tls-cert."""
    http_host: str = "127.0.0.1"
    """Address this watcher's HTTP server binds."""
    http_idle_timeout: float = 15.0
    """Seconds an HTTP connection may stay without a complete request: idle keep-alive, or
    request line and headers not all received yet (a response in progress is not cut)."""
    name: str = ""
    """Watcher name shown by the aggregator; default HOSTNAME:PORT."""
    token: str = ""
    """Shared ingestion token, if the aggregator requires one."""
    token_file: str = ""
    """File the token was read from (from_args puts its content in `token`)."""
    observer: str = "auto"
    """What follows the folder: inotify (read in the event loop, Linux), watchdog (its
    observer thread, any platform), or auto (inotify on Linux, else watchdog)."""
    rescan_interval: float = 30.0
    """Seconds between full rescans that repair missed events (jittered); 0: never."""
    hello_interval: float = 5.0
    """Seconds between legacy hellos (http:// aggregators)."""
    folder_check_interval: float = 1.0
    """Seconds between checks that the folder and the observer are alive."""
    heartbeat_interval: float = 5.0
    """Seconds of idleness before a heartbeat goes out: a third of the aggregator's default
    --ttl (15 s), so two may be lost before an idle watcher's files go. Dead links are
    found sooner by gRPC keepalive; each heartbeat costs the aggregator a read and a write."""
    keepalive: float = 10.0
    """Seconds between gRPC keepalive pings."""
    max_batch: int = 1000
    """Most changes in one batch."""
    batch_delay: float = 0.0
    """Seconds to wait for more changes before sending a batch (0: send at once)."""
    batch_interval: float = 0.005
    """Least seconds between two batches while changes keep coming, and between two reads
    of the folder's inotify events; a change after a quieter spell goes at once (0: every
    change as soon as the previous batch is written)."""
    batch_interval_max: float = 0.04
    """The most the interval between two reads of the folder's inotify events grows to
    while changes keep coming: it doubles from `batch_interval` after each read that
    finds changes waiting, and falls back when one finds none (never below
    `batch_interval`)."""
    resend_buffer: int = 1024
    """Recent batches kept to resume a broken stream without a full snapshot."""
    chunk_bytes: int = 1024 * 1024
    """Approximate size of one snapshot chunk."""
    reconnect_min: float = 0.1
    """First reconnect delay; doubles per failure (with full jitter)."""
    reconnect_max: float = 5.0
    """Cap of the reconnect delay."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_format: str = "auto"
    """kv, json, or auto (json when not on a terminal)."""

    def __post_init__(self) -> None:
        for name in (
            "rescan_interval", "folder_check_interval", "hello_interval",
            "heartbeat_interval", "keepalive", "http_idle_timeout",
            "batch_delay", "batch_interval", "batch_interval_max", "reconnect_min",
            "reconnect_max",
        ):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number")
        targets = self.targets
        for url in targets:
            parts = urlsplit(url)
            if parts.scheme not in SCHEMES:
                raise ValueError(
                    "-aggregator must be grpc://HOST:PORT, grpcs://HOST:PORT or "
                    f"http://HOST:PORT, got {url!r}"
                )
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or port is None or parts.path not in ("", "/"):
                raise ValueError(f"-aggregator needs a host and a port, got {url!r}")
        if len(set(targets)) < len(targets):
            raise ValueError(f"-aggregator names an aggregator twice: {self.aggregator!r}")
        if len(targets) > 1 and any(urlsplit(url).scheme == "http" for url in targets):
            raise ValueError(
                "the legacy protocol (http://) reports to one aggregator; "
                "use grpc:// targets to feed several"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        secure = any(urlsplit(url).scheme == "grpcs" for url in targets)
        if (self.tls_ca or self.tls_cert) and not secure:
            raise ValueError("--tls-ca, --tls-cert and --tls-key need a grpcs:// aggregator")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"-p must be a port number, got {self.port}")
        if self.http_idle_timeout <= 0:
            raise ValueError("--http-idle-timeout must be positive")
        if (
            min(
                self.rescan_interval, self.batch_delay, self.batch_interval, self.batch_interval_max
            )
            < 0
        ):
            raise ValueError("intervals must not be negative")
        if (
            min(
                self.folder_check_interval,
                self.hello_interval,
                self.heartbeat_interval,
                self.keepalive,
                self.reconnect_min,
                self.reconnect_max,
            )
            <= 0
        ):
            raise ValueError("heartbeat, keepalive and reconnect delays must be positive")
        if self.max_batch <= 0 or self.resend_buffer <= 0 or self.chunk_bytes <= 0:
            raise ValueError("sizes must be positive")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"unknown --log-level {self.log_level!r}")
        if self.log_format not in ("kv", "json", "auto"):
            raise ValueError(f"unknown --log-format {self.log_format!r}")

    @property
    def targets(self) -> tuple[str, ...]:
        """The aggregators to report to: the URLs of -aggregator, scheme in lower case."""
        urls = (url.strip() for url in self.aggregator.split(","))
        return tuple(urlsplit(url).geturl() for url in urls)

    @property
    def protocol(self) -> str:
        """ "grpc" (grpc:// and grpcs://) or "http" (legacy), from -aggregator's scheme."""
        return "http" if urlsplit(self.targets[0]).scheme == "http" else "grpc"


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line: `-dir=PATH -p=PORT -aggregator=URL` as the Go watcher, and long forms."""
    d = WatcherConfig()
    p = argparse.ArgumentParser(
        prog="filewatch-watcher",
        description="filewatch watcher: watches one folder and reports it to the aggregator.",
        allow_abbrev=False,
    )

    def opt(*names: str, help: str, **kw: Any) -> None:
        add_config_flag(p, env, d, *names, help=help, **kw)

    opt("-dir", "--dir", help="folder to watch")
    # Go's flag package also takes --p: so do we.
    opt("-p", "--p", "--port", help="this watcher's HTTP port", dest="port")
    opt(
        "-aggregator",
        "--aggregator",
        help="grpc://HOST:PORT (streaming; grpcs:// for TLS), several comma-separated "
        "(one stream to each), or one http://HOST:PORT (legacy protocol)",
    )
    opt("--tls-ca", help="CA certificate (PEM) for grpcs:// aggregators", metavar="PATH")
    opt("--tls-cert", help="client certificate chain (PEM) for mTLS", metavar="PATH")
    opt("--tls-key", help="private key (PEM) of --tls-cert", metavar="PATH")
    opt("--http-host", help="address this watcher's HTTP server binds")
    opt(
        "--http-idle-timeout",
        help="seconds an HTTP connection may stay without a complete request (idle keep-alive, "
        "or headers still unsent), then it is closed; a response in progress is not cut",
    )
    opt("--name", help="watcher name (default HOSTNAME:PORT)")
    opt("--token", help=CREDENTIAL_HELP)
    opt("--token-file", help=CREDENTIAL_FILE_HELP, metavar="PATH")
    opt(
        "--observer",
        help="what follows the folder: inotify (Linux, in the event loop), watchdog (a thread, "
        "any platform), auto (inotify on Linux)",
        choices=KINDS,
    )
    opt("--rescan-interval", help="seconds between repair rescans, 0 = never")
    opt("--hello-interval", help="seconds between legacy hellos")
    opt("--folder-check-interval", help="seconds between folder/observer checks")
    opt("--heartbeat-interval", help="idle seconds before a heartbeat")
    opt("--keepalive", help="seconds between gRPC keepalive pings")
    opt("--max-batch", help="most changes per batch")
    opt("--batch-delay", help="seconds to gather changes before a batch")
    opt(
        "--batch-interval",
        help="least seconds between batches, and reads of inotify events, while changes keep "
        "coming (a lone change goes at once)",
    )
    opt(
        "--batch-interval-max",
        help="most seconds between reads of inotify events while changes keep coming (the "
        "interval doubles from --batch-interval while each read finds more)",
    )
    opt("--resend-buffer", help="batches kept for resume")
    opt("--chunk-bytes", help="snapshot chunk size")
    opt("--reconnect-min", help="first reconnect delay")
    opt("--reconnect-max", help="reconnect delay cap")
    opt("--log-level", help="debug|info|warning|error")
    opt("--log-format", help="kv|json|auto")
    return p


def from_args(argv: Sequence[str], env: Mapping[str, str]) -> WatcherConfig:
    """Build the config from a command line and an environment (both injected)."""
    ns = build_parser(env).parse_args(list(argv))
    ns.token = resolve_token(ns.token, ns.token_file)
    return WatcherConfig(**vars(ns))
