"""TLS and mutual TLS on the aggregator's gRPC port and HTTP listeners (real servers, loopback).

Certificates come from trustme: a throwaway CA per test, its PEMs in tmp_path.
Each test starts a real `Aggregator` on 127.0.0.1 port 0 (the `make_aggregator`
fixture) with `--tls-cert`/`--tls-key` (and `--tls-client-ca` for mTLS), and
talks to it with real clients: grpc.aio channels, aiohttp, the grpcurl binary,
and `python -m aggregator` for the start-up errors.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
from structlog.testing import capture_logs

from aggregator.app import Aggregator
from aggregator.config import from_args
from aggregator.errors import StartupError
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc
from tests.aggregator.grpc_support import (
    BASE_CONFIG,
    HOST,
    TIMEOUT,
    AggregatorFactory,
    Peer,
    expect_rpc_error,
    listed,
    names_of,
)
from tests.support import ROOT

GRPCURL = Path(sys.executable).parent / "grpcurl"


@dataclass(frozen=True)
class Pki:
    """A server CA and its server certificate, a client CA and its client certificate, on disk."""

    ca: trustme.CA
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    client_ca: trustme.CA
    client_ca_pem: Path
    client: trustme.LeafCert
    client_cert_pem: Path
    client_key_pem: Path

    def ssl_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A client context trusting the server CA (presenting the client cert if asked)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if client_cert:
            self.client.configure_cert(ctx)
        return ctx

    def grpc_credentials(self, *, client_cert: bool = False) -> Any:
        """Channel credentials trusting the server CA (presenting the client cert if asked)."""
        if not client_cert:
            return grpc.ssl_channel_credentials(root_certificates=self.ca_pem.read_bytes())
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem.read_bytes(),
            private_key=self.client_key_pem.read_bytes(),
            certificate_chain=self.client_cert_pem.read_bytes(),
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, client_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    client = client_ca.issue_cert("watcher1")
    paths = {
        name: tmp_path / f"{name}.pem"
        for name in ("ca", "cert", "key", "client-ca", "client-cert", "client-key")
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    client_ca.cert_pem.write_to_path(str(paths["client-ca"]))
    client.private_key_pem.write_to_path(str(paths["client-key"]))
    paths["client-cert"].write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    return Pki(
        ca=ca,
        ca_pem=paths["ca"],
        cert_pem=paths["cert"],
        key_pem=paths["key"],
        client_ca=client_ca,
        client_ca_pem=paths["client-ca"],
        client=client,
        client_cert_pem=paths["client-cert"],
        client_key_pem=paths["client-key"],
    )


def tls_flags(pki: Pki, *, mutual: bool = False) -> dict[str, str]:
    """Config overrides serving the server cert (asking for client certs if `mutual`)."""
    flags = {"tls_cert": str(pki.cert_pem), "tls_key": str(pki.key_pem)}
    if mutual:
        flags["tls_client_ca"] = str(pki.client_ca_pem)
    return flags


@pytest.fixture
async def tls_aggregator(make_aggregator: AggregatorFactory, pki: Pki) -> Aggregator:
    """An aggregator serving TLS (no client certificates asked)."""
    return await make_aggregator(**tls_flags(pki))


@pytest.fixture
async def mtls_aggregator(make_aggregator: AggregatorFactory, pki: Pki) -> Aggregator:
    """An aggregator requiring client certificates signed by the client CA."""
    return await make_aggregator(**tls_flags(pki, mutual=True))


@pytest.fixture
async def secure(tls_aggregator: Aggregator, pki: Pki) -> AsyncIterator[Any]:
    """A TLS channel to `tls_aggregator`, trusting the CA."""
    target = f"{HOST}:{tls_aggregator.grpc_port}"
    async with grpc.aio.secure_channel(target, pki.grpc_credentials()) as channel:
        yield channel


async def list_via(target: str, credentials: Any | None) -> Any:
    """One ListFiles over a fresh channel (plaintext if `credentials` is None)."""
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        stub = filewatch_pb2_grpc.FileIndexStub(channel)
        return await asyncio.wait_for(stub.ListFiles(pb.ListFilesRequest()), TIMEOUT)


async def http_get(
    port: int, ssl_context: ssl.SSLContext | None, scheme: str = "https"
) -> tuple[int, Any]:
    """GET /files/ on one HTTP listener: (status, parsed body)."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(
            f"{scheme}://{HOST}:{port}/files/", ssl=ssl_context if ssl_context else False
        ) as resp,
    ):
        return resp.status, await resp.json()


async def grpcurl(*args: str) -> tuple[int, str]:
    """Run the grpcurl binary without blocking the loop the aggregator runs in."""
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# ---------------------------------------------------------------- gRPC


async def test_grpc_over_tls_serves_file_index_and_sync(
    tls_aggregator: Aggregator, secure: Any
) -> None:
    assert await listed(secure) == []
    peer = Peer(secure, "w1")
    welcome = await peer.hello()
    assert not welcome.resume
    answer = await peer.snapshot([b"a.txt", b"b.txt"])
    assert answer.WhichOneof("kind") == "ack", answer
    assert await names_of(secure, "w1") == [b"a.txt", b"b.txt"]


async def test_a_plaintext_grpc_client_is_refused_and_changes_nothing(
    tls_aggregator: Aggregator, secure: Any
) -> None:
    target = f"{HOST}:{tls_aggregator.grpc_port}"
    assert await expect_rpc_error(list_via(target, None)) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(target) as plain:
        peer = Peer(plain, "intruder")
        assert await peer.status() == grpc.StatusCode.UNAVAILABLE
    assert await listed(secure) == []
    assert tls_aggregator.index.watcher_count == 0


async def test_a_client_trusting_another_ca_is_refused(tls_aggregator: Aggregator) -> None:
    other = trustme.CA().cert_pem.bytes()
    target = f"{HOST}:{tls_aggregator.grpc_port}"
    credentials = grpc.ssl_channel_credentials(root_certificates=other)
    assert await expect_rpc_error(list_via(target, credentials)) == grpc.StatusCode.UNAVAILABLE


async def test_grpcurl_lists_the_services_with_the_ca(tls_aggregator: Aggregator, pki: Pki) -> None:
    target = f"{HOST}:{tls_aggregator.grpc_port}"
    code, out = await grpcurl("-cacert", str(pki.ca_pem), target, "list")
    assert code == 0, out
    assert "filewatch.v1.FileIndex" in out.split(), out
    code, out = await grpcurl("-plaintext", "-connect-timeout", "1", target, "list")
    assert code != 0, out


# ---------------------------------------------------------------- HTTP


async def test_every_http_listener_serves_https_only(
    make_aggregator: AggregatorFactory, pki: Pki
) -> None:
    aggregator = await make_aggregator(http=(f"{HOST}:0", f"{HOST}:0"), **tls_flags(pki))
    assert len(aggregator.http_ports) == 2
    for port in aggregator.http_ports:
        status, body = await http_get(port, pki.ssl_context())
        assert status == 200 and body["files"] == [], body
        with pytest.raises(aiohttp.ClientError):
            await http_get(port, None, scheme="http")
        other = ssl.create_default_context()
        trustme.CA().configure_trust(other)
        with pytest.raises(aiohttp.ClientError):
            await http_get(port, other)


# ---------------------------------------------------------------- mTLS


async def test_mtls_refuses_clients_without_a_certificate(
    mtls_aggregator: Aggregator, pki: Pki
) -> None:
    target = f"{HOST}:{mtls_aggregator.grpc_port}"
    refused = await expect_rpc_error(list_via(target, pki.grpc_credentials()))
    assert refused == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(target, pki.grpc_credentials()) as channel:
        assert await Peer(channel, "anonymous").status() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(aiohttp.ClientError):
        await http_get(mtls_aggregator.http_ports[0], pki.ssl_context())
    assert mtls_aggregator.index.watcher_count == 0


async def test_mtls_refuses_a_certificate_of_another_ca(
    mtls_aggregator: Aggregator, pki: Pki, tmp_path: Path
) -> None:
    stranger = pki.ca.issue_cert("watcher1")  # the server CA, not the client CA
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem.read_bytes(),
        private_key=stranger.private_key_pem.bytes(),
        certificate_chain=stranger.cert_chain_pems[0].bytes(),
    )
    target = f"{HOST}:{mtls_aggregator.grpc_port}"
    assert await expect_rpc_error(list_via(target, credentials)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_with_a_certificate_of_the_client_ca(
    mtls_aggregator: Aggregator, pki: Pki
) -> None:
    target = f"{HOST}:{mtls_aggregator.grpc_port}"
    async with grpc.aio.secure_channel(target, pki.grpc_credentials(client_cert=True)) as channel:
        await Peer(channel, "watcher1").join([b"x"])
        assert await names_of(channel, "watcher1") == [b"x"]
    status, body = await http_get(mtls_aggregator.http_ports[0], pki.ssl_context(client_cert=True))
    assert status == 200, body
    assert [f["filename"] for f in body["files"]] == ["x"]
    code, out = await grpcurl(
        "-cacert", str(pki.ca_pem),
        "-cert", str(pki.client_cert_pem),
        "-key", str(pki.client_key_pem),
        target, "list",
    )  # fmt: skip
    assert code == 0 and "filewatch.v1.FileIndex" in out.split(), out


# ---------------------------------------------------------------- start-up


async def test_the_started_line_says_whether_tls_is_on(
    make_aggregator: AggregatorFactory, pki: Pki
) -> None:
    with capture_logs() as logs:
        await make_aggregator()
        await make_aggregator(**tls_flags(pki))
        await make_aggregator(**tls_flags(pki, mutual=True))
    modes = [e["tls"] for e in logs if e["event"] == "aggregator_started"]
    assert modes == ["off", "tls", "mtls"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--tls-cert", "c.pem"], "give both or neither", id="cert-alone"),
        pytest.param(["--tls-key", "k.pem"], "give both or neither", id="key-alone"),
        pytest.param(
            ["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert", id="ca-alone"
        ),
    ],
)
def test_incomplete_tls_flags_are_value_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_args(argv, {})


def test_tls_flags_have_env_twins() -> None:
    env = {
        "FILEWATCH_TLS_CERT": "c.pem",
        "FILEWATCH_TLS_KEY": "k.pem",
        "FILEWATCH_TLS_CLIENT_CA": "ca.pem",
    }
    cfg = from_args([], env)
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == ("c.pem", "k.pem", "ca.pem")
    assert from_args([], {}).tls_cert == ""  # plaintext by default


async def _start_error(**overrides: Any) -> str:
    aggregator = Aggregator(replace(BASE_CONFIG, **overrides))
    try:
        with pytest.raises(StartupError) as caught:
            await aggregator.start()
    finally:
        await aggregator.stop()
    return str(caught.value)


async def test_unusable_files_are_startup_errors(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    other_key = tmp_path / "other.key"
    pki.ca.issue_cert(HOST).private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = str(pki.cert_pem), str(pki.key_pem)
    cases = {
        f"--tls-key {missing!r}: cannot read it: No such file or directory": {
            "tls_cert": cert, "tls_key": missing,
        },
        f"--tls-cert {missing!r}: cannot read it: No such file or directory": {
            "tls_cert": missing, "tls_key": key,
        },
        f"--tls-key {str(other_key)!r} does not match the certificate of --tls-cert {cert!r}": {
            "tls_cert": cert, "tls_key": str(other_key),
        },
        f"--tls-cert {str(garbage)!r} holds no PEM certificate": {
            "tls_cert": str(garbage), "tls_key": key,
        },
        f"--tls-client-ca {str(garbage)!r} holds no PEM certificate": {
            "tls_cert": cert, "tls_key": key, "tls_client_ca": str(garbage),
        },
    }  # fmt: skip
    for expected, overrides in cases.items():
        assert await _start_error(**overrides) == expected


def run_aggregator(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator", "--http", f"{HOST}:0", "--grpc", f"{HOST}:0", *argv],
        cwd=ROOT,
        # Hermetic: no flag twins from the caller's environment.
        env={k: v for k, v in os.environ.items() if not k.startswith("FILEWATCH_")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_process_says_why_in_one_line(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.key")
    done = run_aggregator("--tls-cert", str(pki.cert_pem), "--tls-key", missing)
    assert done.returncode == 1, done
    expected = f"aggregator: --tls-key {missing!r}: cannot read it: No such file or directory"
    assert done.stderr.strip().splitlines() == [expected], done.stderr
    done = run_aggregator("--tls-cert", str(pki.cert_pem))
    assert done.returncode == 2, done
    expected = "aggregator: --tls-cert and --tls-key go together: give both or neither"
    assert done.stderr.strip().splitlines() == [expected], done.stderr
