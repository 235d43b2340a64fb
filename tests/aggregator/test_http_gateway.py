"""The aggregator's HTTP read side over real sockets.

The production `make_app` is served by an aiohttp AppRunner on 127.0.0.1
port 0 and read with a real aiohttp client; data goes in through the same
`Store` methods the ingestion adapters call, on the same event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from aggregator.app import Aggregator
from aggregator.config import AggregatorConfig
from aggregator.http_gateway import BODIES, make_app
from aggregator.index import Change, Index, Meta, Op, pack_meta
from aggregator.store import Store
from aggregator.telemetry import Metrics
from tests.support import wait_for_async

HOST = "127.0.0.1"
JSON_UTF8 = "application/json; charset=utf-8"
MTIME_NS = 1_700_000_000_123_456_000
MTIME_TEXT = "2023-11-14T22:13:20.123456Z"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass
class Gateway:
    """A served gateway app, its store and a client session for it."""

    store: Store
    metrics: Metrics
    app: web.Application
    base: str
    session: aiohttp.ClientSession
    runner: web.AppRunner

    async def get(self, path: str, **headers: str) -> tuple[int, Mapping[str, str], bytes]:
        """GET a path; returns (status, headers, raw body), never following redirects."""
        async with self.session.get(
            self.base + path, headers=headers, allow_redirects=False
        ) as response:
            return response.status, response.headers, await response.read()

    def install(self, node: str, files: Mapping[bytes, Meta], sequence: int = 0) -> None:
        """Install `files` as the snapshot of `node`, as the Sync stream does."""
        index = self.store.index
        index.begin_snapshot(node, "epoch-1")
        index.extend_snapshot(node, files.items())
        self.store.commit_snapshot(node, sequence, "test")

    def apply(self, node: str, sequence: int, *changes: Change, observed_ns: int = 0) -> None:
        """Apply a batch, as the Sync stream does."""
        self.store.apply_batch(
            node, "epoch-1", sequence, changes, protocol="grpc", observed_ns=observed_ns
        )


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    """`make_app` over a real store, on a real socket, with an undecoding client."""
    metrics = Metrics()
    store = Store(Index(), metrics)
    app = make_app(store, metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        # Bodies are checked as sent: no automatic decompression.
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            yield Gateway(store, metrics, app, f"http://{HOST}:{port}", session, runner)
    finally:
        await runner.cleanup()


def meta(size: int = 1, mtime_ns: int = MTIME_NS) -> Meta:
    """File metadata with defaults."""
    return pack_meta(size, mtime_ns)


def decode(body: bytes) -> Any:
    """A JSON body, checked to be strict UTF-8 first."""
    return json.loads(body.decode("utf-8"))


def more_than_the_kernel_takes() -> dict[bytes, Meta]:
    """A list of at least 9 MB and twice what one socket may buffer (tcp_wmem's maximum):
    so that the server is still writing while the reader holds back."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 * 1024 * 1024
    count = max(250_000, 2 * wmem_max // 36)  # about 36 bytes per listed file
    return {b"big-%07d.txt" % i: meta() for i in range(count)}


# ---------------------------------------------------------------- the /files/ body


@pytest.mark.parametrize("path", ["/files/", "/files"])
async def test_files_body_is_exactly_the_documented_shape(gateway: Gateway, path: str) -> None:
    gateway.install("node-a", {b"dog.jpg": meta(), b"cat.jpg": meta()})
    status, headers, body = await gateway.get(path, **{"Accept-Encoding": "identity"})
    assert status == 200
    assert headers["Content-Type"] == JSON_UTF8
    assert "Content-Encoding" not in headers
    assert body == b'{"files":[{"filename":"cat.jpg"},{"filename":"dog.jpg"}]}'


async def test_an_empty_index_lists_no_files(gateway: Gateway) -> None:
    status, headers, body = await gateway.get("/files/")
    assert status == 200
    assert headers["Content-Type"] == JSON_UTF8
    assert decode(body) == {"files": []}


async def test_files_are_sorted_by_code_point_then_node(gateway: Gateway) -> None:
    names = ["b.txt", "B.txt", "a.txt", "é.txt", "z.txt", "😀.txt", ".hidden", 'a b\'s "q".txt']
    gateway.install("node-b", {n.encode(): meta() for n in names})
    gateway.install("node-a", {b"a.txt": meta(), b"zz.txt": meta()})
    _, _, body = await gateway.get("/files/?detail=1")
    listed = [(f["filename"], f["node"]) for f in decode(body)["files"]]
    expected = sorted([(n, "node-b") for n in names] + [("a.txt", "node-a"), ("zz.txt", "node-a")])
    assert listed == expected
    assert listed[:3] == [(".hidden", "node-b"), ("B.txt", "node-b"), ('a b\'s "q".txt', "node-b")]
    assert ("a.txt", "node-a") < ("a.txt", "node-b")
    assert listed.index(("a.txt", "node-a")) + 1 == listed.index(("a.txt", "node-b"))

    _, _, plain = await gateway.get("/files/")
    assert [f["filename"] for f in decode(plain)["files"]] == [n for n, _ in expected]


async def test_detail_adds_node_size_modified_version_and_count(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta(size=10), b"b.txt": meta(size=0, mtime_ns=1)})
    gateway.install("node-b", {b"a.txt": meta(size=7, mtime_ns=MTIME_NS + 1_000_000_000)})
    status, headers, body = await gateway.get("/files/?detail=1")
    assert status == 200
    assert headers["Content-Type"] == JSON_UTF8
    doc = decode(body)
    assert set(doc) == {"files", "version", "count"}
    assert doc["version"] == gateway.store.index.version
    assert doc["count"] == 3
    assert doc["files"][0] == {
        "filename": "a.txt",
        "node": "node-a",
        "size": 10,
        "modified": MTIME_TEXT,
    }
    assert doc["files"][1]["modified"] == "2023-11-14T22:13:21.123456Z"
    for entry in doc["files"]:
        assert set(entry) == {"filename", "node", "size", "modified"}
        assert RFC3339_UTC.match(entry["modified"]), entry
    # detail=0 (or anything not truthy) keeps the default shape.
    _, _, plain = await gateway.get("/files/?detail=0")
    assert set(decode(plain)) == {"files"}
    assert all(set(e) == {"filename"} for e in decode(plain)["files"])


async def test_detail_follows_a_modify_and_a_resnapshot(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta(size=1), b"b.txt": meta(size=2)})
    _, _, before = await gateway.get("/files/?detail=1")
    assert [e["size"] for e in decode(before)["files"]] == [1, 2]

    # A content change keeps the name (and the page of names) but not the detail.
    later = MTIME_NS + 5_000_000_000
    gateway.apply("node-a", 1, Change(Op.MODIFY, b"a.txt", meta(size=10, mtime_ns=later)))
    _, _, after = await gateway.get("/files/?detail=1")
    doc = decode(after)
    assert doc["version"] == gateway.store.index.version
    assert doc["files"][0] == {
        "filename": "a.txt",
        "node": "node-a",
        "size": 10,
        "modified": "2023-11-14T22:13:25.123456Z",
    }

    # A new snapshot with other metadata for the same names, likewise.
    gateway.install("node-a", {b"a.txt": meta(size=100), b"b.txt": meta(size=200)}, sequence=2)
    _, _, again = await gateway.get("/files/?detail=1")
    assert [e["size"] for e in decode(again)["files"]] == [100, 200]


async def test_a_non_utf8_name_is_listed_with_a_lossless_escape(gateway: Gateway) -> None:
    raw = b"caf\xe9.txt"
    mixed = "😀-".encode() + b"\xff\xfe-" + "é.txt".encode()
    gateway.install("node-a", {raw: meta(), mixed: meta(), b"plain.txt": meta()})
    for path in ("/files/", "/files/?detail=1"):
        status, _, body = await gateway.get(path)
        assert status == 200
        assert b"\\udce9" in body  # the documented escape of byte 0xE9
        names = [e["filename"] for e in decode(body)["files"]]
        assert "caf\udce9.txt" in names
        assert sorted(os.fsencode(n) for n in names) == sorted([raw, mixed, b"plain.txt"])


# ---------------------------------------------------------------- caching, ETag, gzip


async def test_etag_and_if_none_match(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta()})
    status, headers, _ = await gateway.get("/files/")
    assert status == 200
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')

    status, headers, body = await gateway.get("/files/", **{"If-None-Match": etag})
    assert status == 304
    assert body == b""
    assert headers["ETag"] == etag
    status, _, _ = await gateway.get("/files/", **{"If-None-Match": f'"other", {etag}'})
    assert status == 304

    # The detail body is another representation: another ETag.
    _, detail_headers, _ = await gateway.get("/files/?detail=1")
    assert detail_headers["ETag"] != etag
    status, _, _ = await gateway.get("/files/?detail=1", **{"If-None-Match": etag})
    assert status == 200

    # A change makes a new ETag; the old one no longer matches.
    gateway.apply("node-a", 1, Change(Op.ADD, b"b.txt", meta()))
    status, headers, body = await gateway.get("/files/", **{"If-None-Match": etag})
    assert status == 200
    assert headers["ETag"] != etag
    assert decode(body) == {"files": [{"filename": "a.txt"}, {"filename": "b.txt"}]}

    # A change that is a no-op (same metadata) keeps the ETag.
    new_etag = headers["ETag"]
    gateway.apply("node-a", 2, Change(Op.MODIFY, b"b.txt", meta()))
    status, _, _ = await gateway.get("/files/", **{"If-None-Match": new_etag})
    assert status == 304


async def test_etags_differ_between_two_app_instances(gateway: Gateway) -> None:
    # A restarted aggregator starts again at version 0: its ETags must not collide.
    gateway.install("node-a", {b"a.txt": meta()})
    _, headers, _ = await gateway.get("/files/")
    other = make_app(gateway.store, gateway.metrics)
    assert other[BODIES].get(False).etag != headers["ETag"]


async def test_a_large_body_is_gzipped_when_accepted(gateway: Gateway) -> None:
    gateway.install("node-a", {b"file-%04d.txt" % i: meta() for i in range(300)})
    status, headers, plain = await gateway.get("/files/", **{"Accept-Encoding": "identity"})
    assert status == 200
    assert "Content-Encoding" not in headers
    assert len(plain) > 1024

    status, headers, zipped = await gateway.get("/files/", **{"Accept-Encoding": "gzip, br"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == JSON_UTF8
    assert "Accept-Encoding" in headers["Vary"]
    assert len(zipped) < len(plain)
    assert gzip.decompress(zipped) == plain

    _, headers, detail = await gateway.get("/files/?detail=1", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert len(decode(gzip.decompress(detail))["files"]) == 300


async def test_a_small_body_is_not_gzipped(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta()})
    status, headers, body = await gateway.get("/files/", **{"Accept-Encoding": "gzip"})
    assert status == 200
    assert "Content-Encoding" not in headers
    assert decode(body) == {"files": [{"filename": "a.txt"}]}


async def test_the_body_is_encoded_once_per_version(gateway: Gateway) -> None:
    gateway.install("node-a", {b"file-%04d.txt" % i: meta() for i in range(300)})
    bodies = gateway.app[BODIES]
    _, _, first_bytes = await gateway.get("/files/", **{"Accept-Encoding": "identity"})
    cached = bodies.get(False)
    assert cached.version == gateway.store.index.version
    assert cached.plain == first_bytes

    _, _, second_bytes = await gateway.get("/files/", **{"Accept-Encoding": "gzip"})
    _, _, third_bytes = await gateway.get("/files/", **{"Accept-Encoding": "gzip"})
    assert bodies.get(False) is cached  # not re-encoded between readers
    assert cached.gzipped is not None
    assert second_bytes == third_bytes == cached.gzipped
    assert id(bodies.gzipped(cached)) == id(cached.gzipped)  # compressed once

    gateway.apply("node-a", 1, Change(Op.REMOVE, b"file-0000.txt"))
    _, _, after = await gateway.get("/files/", **{"Accept-Encoding": "identity"})
    rebuilt = bodies.get(False)
    assert rebuilt is not cached
    assert rebuilt.version == gateway.store.index.version == cached.version + 1
    assert rebuilt.plain == after
    assert b"file-0000.txt" not in after


async def test_a_list_of_several_megabytes_is_sent_whole(gateway: Gateway) -> None:
    # Past 64 KB the body goes out after its headers, in 1 MB slices of the cached body.
    files = {b"big-%06d.txt" % i: meta() for i in range(60_000)}
    gateway.install("node-a", files)
    cached = gateway.app[BODIES].get(False)
    assert len(cached.plain) > 1024 * 1024  # more than one slice

    status, headers, body = await gateway.get("/files/", **{"Accept-Encoding": "identity"})
    assert status == 200
    assert headers["Content-Type"] == JSON_UTF8
    assert headers["ETag"] == cached.etag
    assert int(headers["Content-Length"]) == len(body)
    assert body == cached.plain
    assert [f["filename"] for f in decode(body)["files"]] == sorted(n.decode() for n in files)

    _, headers, zipped = await gateway.get("/files/", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped) == cached.plain

    identity = {"Accept-Encoding": "identity"}
    async with gateway.session.head(gateway.base + "/files/", headers=identity) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(cached.plain)
        assert await response.read() == b""
    status, _, again = await gateway.get("/files/", **{"Accept-Encoding": "identity"})
    assert status == 200 and again == body


async def test_a_reader_leaving_mid_list_is_no_error(gateway: Gateway) -> None:
    gateway.install("node-a", more_than_the_kernel_takes())
    host, port = gateway.base.removeprefix("http://").split(":")
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection(host, int(port), limit=4096)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server must wait on us
        writer.write(b"GET /files/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # a reset, with most of the list unsent
        await writer.wait_closed()
        status, _, body = await gateway.get("/files/", **{"Accept-Encoding": "identity"})
    assert status == 200
    assert body == gateway.app[BODIES].get(False).plain
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


async def test_a_reader_that_stops_reading_holds_a_slice_not_a_copy(gateway: Gateway) -> None:
    # What the kernel does not take waits in the server's write buffer.
    gateway.install("node-a", more_than_the_kernel_takes())
    host, port = gateway.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=4096)
    try:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"GET /files/ HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        server = gateway.runner.server
        assert server is not None
        sizes: list[int] = []
        deadline = time.monotonic() + 10
        while len(sizes) < 20 and time.monotonic() < deadline:  # we read nothing more
            buffered = [
                c.transport.get_write_buffer_size()
                for c in server.connections
                if c.transport is not None
            ]
            if any(buffered):
                sizes.append(max(buffered))
            await asyncio.sleep(0.01)
        assert len(sizes) == 20, "the server never had to wait for the reader"
        assert max(sizes) <= 1024 * 1024 + 64 * 1024  # one slice (and the high-water mark)
    finally:
        writer.close()
        await writer.wait_closed()

    async def connections() -> int:
        return len(server.connections)

    # The server's handler sees the reader gone and its connection closes.
    await wait_for_async(connections, 10, until=lambda n: n == 0, what="the connection closed")


# ---------------------------------------------------------------- the other routes


async def test_an_unknown_route_is_a_404_problem(gateway: Gateway) -> None:
    status, headers, body = await gateway.get("/nope")
    assert status == 404
    assert headers["Content-Type"].startswith("application/problem+json")
    problem = decode(body)
    assert problem["status"] == 404
    assert problem["instance"] == "/nope"
    assert problem["title"]
    assert "type" in problem
    assert "detail" in problem


async def test_a_wrong_method_is_a_405_problem(gateway: Gateway) -> None:
    async with gateway.session.delete(gateway.base + "/files/") as response:
        assert response.status == 405
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert decode(await response.read())["status"] == 405


async def test_metrics_exposes_files_and_sync_lag(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta(), b"b.txt": meta()})
    gateway.apply("node-a", 1, Change(Op.ADD, b"c.txt", meta()), observed_ns=time.time_ns())
    await gateway.get("/files/")
    status, headers, body = await gateway.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert re.search(r"^filewatch_files 3\.0$", text, re.MULTILINE), text
    assert re.search(r'^filewatch_sync_lag_seconds_count\{protocol="grpc"\} 1\.0$', text, re.M)
    assert "# TYPE filewatch_sync_lag_seconds histogram" in text
    assert re.search(r'^filewatch_http_requests_total\{.*status="200"\} ', text, re.MULTILINE)


async def test_healthz_is_ok(gateway: Gateway) -> None:
    gateway.install("node-a", {b"a.txt": meta()})
    status, headers, body = await gateway.get("/healthz")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert decode(body) == {"status": "ok", "files": 1, "watchers": 1}


# ---------------------------------------------------------------- through the aggregator


async def test_the_aggregator_serves_the_same_list_on_every_http_port() -> None:
    config = AggregatorConfig(http=(f"{HOST}:0", f"{HOST}:0"), grpc=f"{HOST}:0", ttl=1.0, grace=1.0)
    aggregator = Aggregator(config)
    await aggregator.start()
    try:
        assert len(aggregator.http_ports) == 2
        store = aggregator.store
        store.index.begin_snapshot("node-a", "e1")
        store.index.extend_snapshot("node-a", [(b"cats.txt", meta()), (b"dogs.txt", meta())])
        store.commit_snapshot("node-a", 0, "test")
        async with aiohttp.ClientSession() as session:
            for port in aggregator.http_ports:
                async with session.get(f"http://{HOST}:{port}/files/") as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"] == JSON_UTF8
                    assert await response.json() == {
                        "files": [{"filename": "cats.txt"}, {"filename": "dogs.txt"}]
                    }
                async with session.get(f"http://{HOST}:{port}/healthz") as response:
                    assert (await response.json())["status"] == "ok"
    finally:
        await aggregator.stop()
