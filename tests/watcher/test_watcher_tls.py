"""A watcher reaching an aggregator over TLS (`grpcs://`, `--tls-ca`) and mutual TLS.

A real TLS `Aggregator` and real `Watcher`s in this event loop, over real
sockets; certificates from trustme, a throwaway CA per test. The aggregator's
list is read through its HTTPS `GET /files/`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from aggregator.app import Aggregator
from aggregator.config import AggregatorConfig
from tests.support import wait_for_async
from watcher.app import Watcher
from watcher.config import WatcherConfig, from_args
from watcher.errors import StartupError

HOST = "127.0.0.1"
TIMEOUT = 15.0
REFUSED_FOR = 2.0
"""How long a refused watcher is watched, to see that it never gets listed."""


@dataclass(frozen=True)
class Certs:
    """The server CA, the server's certificate and key, and a client CA's client cert and key."""

    ca: Path
    cert: Path
    key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    trust: ssl.SSLContext


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca, client_ca, other = trustme.CA(), trustme.CA(), trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    client = client_ca.issue_cert("watcher")
    paths = {n: tmp_path / f"{n}.pem" for n in ("ca", "cert", "key", "cca", "ccert", "ckey", "o")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client_ca.cert_pem.write_to_path(str(paths["cca"]))
    paths["ccert"].write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    client.private_key_pem.write_to_path(str(paths["ckey"]))
    other.cert_pem.write_to_path(str(paths["o"]))
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    client.configure_cert(trust)  # the test's own HTTPS reads pass mTLS too
    return Certs(
        paths["ca"], paths["cert"], paths["key"], paths["cca"], paths["ccert"], paths["ckey"],
        paths["o"], trust,
    )  # fmt: skip


@pytest.fixture
async def aggregator(certs: Certs, request: pytest.FixtureRequest) -> AsyncIterator[Aggregator]:
    """A TLS aggregator; with the `mutual` marker's argument True, it asks client certs."""
    mutual = getattr(request, "param", False)
    agg = Aggregator(
        AggregatorConfig(
            http=(f"{HOST}:0",),
            grpc=f"{HOST}:0",
            ttl=1.0,
            grace=1.0,
            tls_cert=str(certs.cert),
            tls_key=str(certs.key),
            tls_client_ca=str(certs.client_ca) if mutual else "",
        )
    )
    await agg.start()
    try:
        yield agg
    finally:
        await agg.stop()


async def listed(agg: Aggregator, certs: Certs) -> list[str]:
    """The names the aggregator's HTTPS GET /files/ lists."""
    url = f"https://{HOST}:{agg.http_ports[0]}/files/"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=certs.trust) as resp:
        assert resp.status == 200
        body = await resp.json()
    return [entry["filename"] for entry in body["files"]]


class Running:
    """Watchers run as tasks; stopped (and awaited) at the end of the test."""

    def __init__(self) -> None:
        self.stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(self, folder: Path, aggregator: str, **flags: Any) -> Watcher:
        folder.mkdir(exist_ok=True)
        watcher = Watcher(
            WatcherConfig(
                dir=str(folder),
                port=0,
                aggregator=aggregator,
                rescan_interval=0,
                reconnect_max=0.2,
                **flags,
            )
        )
        stop = asyncio.Event()
        self.stops.append((stop, asyncio.create_task(watcher.run(stop))))
        return watcher

    async def close(self) -> None:
        for stop, _ in self.stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*(t for _, t in self.stops)), TIMEOUT)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = Running()
    try:
        yield r
    finally:
        await r.close()


async def until_listed(agg: Aggregator, certs: Certs, names: list[str], what: str) -> None:
    await wait_for_async(
        lambda: listed(agg, certs), TIMEOUT, until=lambda n: n == names, what=what, interval=0.02
    )


async def never_listed(agg: Aggregator, certs: Certs, watcher: Watcher) -> dict[str, Any]:
    """Watch a refused watcher for REFUSED_FOR seconds: the list stays empty, it never goes
    live. Returns its last /healthz."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REFUSED_FOR
    while loop.time() < deadline:
        assert await listed(agg, certs) == []
        assert watcher.health()["stream"] != "live"
        await asyncio.sleep(0.1)
    return watcher.health()


async def test_a_grpcs_watcher_trusting_the_ca_is_served(
    aggregator: Aggregator, certs: Certs, running: Running, tmp_path: Path
) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "secret.txt").write_bytes(b"1")
    running.start(tmp_path / "w", f"grpcs://{HOST}:{aggregator.grpc_port}", tls_ca=str(certs.ca))
    await until_listed(aggregator, certs, ["secret.txt"], "the TLS watcher's file")
    (tmp_path / "w" / "more.txt").write_bytes(b"2")
    await until_listed(aggregator, certs, ["more.txt", "secret.txt"], "a change over TLS")


async def test_plaintext_and_untrusting_watchers_are_refused_and_change_nothing(
    aggregator: Aggregator, certs: Certs, running: Running, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.txt").write_bytes(b"1")
    plain = running.start(tmp_path / "a", f"grpc://{HOST}:{aggregator.grpc_port}")
    await never_listed(aggregator, certs, plain)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "g.txt").write_bytes(b"1")
    untrusting = running.start(
        tmp_path / "b", f"grpcs://{HOST}:{aggregator.grpc_port}", tls_ca=str(certs.other_ca)
    )
    await never_listed(aggregator, certs, untrusting)
    assert aggregator.store.index.watcher_count == 0


@pytest.mark.parametrize("aggregator", [True], indirect=True, ids=["mtls"])
async def test_mtls_serves_a_watcher_with_a_client_certificate_only(
    aggregator: Aggregator, certs: Certs, running: Running, tmp_path: Path
) -> None:
    target = f"grpcs://{HOST}:{aggregator.grpc_port}"
    (tmp_path / "anon").mkdir()
    (tmp_path / "anon" / "x.txt").write_bytes(b"1")
    anonymous = running.start(tmp_path / "anon", target, tls_ca=str(certs.ca))
    await never_listed(aggregator, certs, anonymous)
    (tmp_path / "id").mkdir()
    (tmp_path / "id" / "y.txt").write_bytes(b"1")
    running.start(
        tmp_path / "id",
        target,
        tls_ca=str(certs.ca),
        tls_cert=str(certs.client_cert),
        tls_key=str(certs.client_key),
    )
    await until_listed(aggregator, certs, ["y.txt"], "the watcher with a client certificate")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-ca=missing.pem"], "--tls-ca 'missing.pem': No such file"),
        (["--tls-ca=not-pem.txt"], "--tls-ca 'not-pem.txt': not a PEM certificate"),
        (["--tls-cert=cert", "--tls-key=other-key"], "--tls-cert/--tls-key: not a PEM"),
    ],
)
def test_unusable_tls_files_stop_the_start_with_the_reason(
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-pem.txt").write_text("hello")
    (tmp_path / "cert").write_bytes(certs.client_cert.read_bytes())
    (tmp_path / "other-key").write_bytes(certs.key.read_bytes())  # the server's key: no match
    with pytest.raises(StartupError, match=message.replace("(", r"\(")):
        Watcher(from_args([f"-dir={tmp_path}", "-aggregator=grpcs://127.0.0.1:1", *argv], {}))
