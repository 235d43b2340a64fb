"""Odd names, limits, the token, and who owns what.

Some tests need a second loopback address: 127.0.0.2 (all of 127.0.0.0/8 is
the loopback interface on Linux) plays "another host" for ownership and fetch
checks; nothing binds beyond loopback.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc
from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    RawSync,
    WatcherFactory,
    batch_msg,
    chunk_msg,
    end_msg,
    fill,
    folder_names,
    hello_msg,
    measured,
    wait_listed,
)
from tests.support import Reply, wait_for

JSON = {"Content-Type": "application/json"}
OTHER_HOST = "127.0.0.2"
TOKEN = "s3cret-token"  # noqa: S105 - the tests' own shared token

# ---------------------------------------------------------------- names

UTF8_NAMES = [
    "with space.txt",
    'double"quote.txt',
    "single'quote.txt",
    "back\\slash.txt",
    "new\nline.txt",
    "carriage\rreturn.txt",
    "tab\there.txt",
    "emoji 🐱🐶.txt",
    ".hidden",
    "..two-dots",
    "a" * 255,
    "é" * 127 + "x",  # 255 bytes, 128 characters
    "日本語のファイル.txt",
    "\u200bzero-width",
    "-leading-dash",
    "#hash %41 ?q=1&x=2",
    "<b>html<b>",
    "trailing space ",
    "del\x7f.txt",
    "ctrl\x01.txt",
    "{json}:[1].txt",
]
RAW_NAMES = [
    b"caf\xe9.txt",  # Latin-1
    b"\xff\xfe",
    b"\xed\xa0\x80surrogate",  # an encoded surrogate: not valid UTF-8
    b"cut-\xc3",  # a truncated sequence
    b"\xc0\xafoverlong",
]


def _make_odd_folder(folder: Path) -> list[bytes]:
    folder.mkdir(parents=True)
    raws = [n.encode() for n in UTF8_NAMES] + RAW_NAMES
    for raw in raws:
        with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
            f.write(raw)
    return raws


@pytest.mark.timeout(60)
def test_odd_and_undecodable_names_are_listed_exactly(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    channels: Callable[[str], grpc.Channel],
    tmp_path: Path,
) -> None:
    """gRPC: every name exactly, undecodable bytes as lossless \\udcXX escapes (README).

    Legacy: our watcher sends those same escapes (the Go watcher's U+FFFD would merge
    names), so its names are listed exactly too.
    """
    grpc_dir, legacy_dir = tmp_path / "grpc", tmp_path / "legacy"
    raws = _make_odd_folder(grpc_dir)
    _make_odd_folder(legacy_dir)
    agg = start_aggregator(ttl=30.0)
    start_watcher(grpc_dir, agg.grpc_url, name="odd")
    lw = start_watcher(legacy_dir, agg.http_url)
    legacy_node = f"127.0.0.1:{lw.http_port}"

    lossless = sorted(os.fsdecode(r) for r in raws)
    wait_for(
        lambda: agg.node_files("odd"), SYNC_TIMEOUT, until=lambda f: f == lossless, what="gRPC"
    )
    wait_for(
        lambda: agg.node_files(legacy_node),
        SYNC_TIMEOUT,
        until=lambda f: f == lossless,
        what="legacy names",
    )
    body = agg.request("GET", "/files/").body
    assert b'"caf\\udce9.txt"' in body, "the documented escape of an undecodable byte"
    listed = agg.files()
    assert listed == sorted(listed), "code point order"
    assert {os.fsencode(n) for n in agg.node_files("odd")} == set(raws), "lossless round trip"
    stub = pb_grpc.FileIndexStub(channels(agg.grpc_target))
    page = stub.ListFiles(pb.ListFilesRequest(page_size=1000))
    assert sorted(f.raw_name for f in page.files if f.node == "odd") == sorted(raws)

    # Renamed and deleted, the odd names go as exactly as they came.
    os.rename(os.path.join(os.fsencode(grpc_dir), b"caf\xe9.txt"), grpc_dir / "plain.txt")
    os.unlink(grpc_dir / "new\nline.txt")
    os.unlink(os.path.join(os.fsencode(grpc_dir), b"\xff\xfe"))
    wait_listed(agg, "odd", grpc_dir, what="odd names renamed and removed", timeout=SYNC_TIMEOUT)


# ---------------------------------------------------------------- limits


@pytest.mark.timeout(60)
def test_limits_are_refused_clearly_and_nothing_grows(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    channels: Callable[[str], grpc.Channel],
    tmp_path: Path,
) -> None:
    agg = start_aggregator(
        "--max-watchers", "3",
        "--max-files-per-watcher", "50",
        "--max-message-bytes", "65536",
        "--max-readers", "2",
        "--max-body-bytes", "4096",
        ttl=30.0,
    )  # fmt: skip
    channel = channels(agg.grpc_target)
    rss_before = agg.proc.rss_kib()

    # Files per watcher: a snapshot of 51, then a batch from 50 to 51.
    sync = RawSync(channel).send(hello_msg("big", "e1"), chunk_msg([b"f%d" % i for i in range(51)]))
    sync.send(end_msg(1, 51)).close()
    code, details = sync.status()
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "50 files" in details, (code, details)
    sync = RawSync(channel).send(hello_msg("big", "e2"), chunk_msg([b"f%d" % i for i in range(50)]))
    sync.send(end_msg(1, 50))
    sync.recv_kind("welcome")
    sync.recv_kind("ack")
    sync.send(batch_msg(2, (pb.OP_ADD, b"one-too-many"))).close()
    code, details = sync.status()
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "50 files" in details, (code, details)
    assert len(agg.node_files("big")) == 50

    # Message size: one chunk of ~100 KB against a 64 KiB limit.
    sync = RawSync(channel).send(hello_msg("huge", "e1"))
    sync.send(chunk_msg([b"%04d" % i + b"x" * 1000 for i in range(100)])).close()
    code, details = sync.status()
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert agg.node_files("huge") == []

    # Watchers: "big" holds one slot; two more fit, the fourth is refused on both protocols.
    held = []
    for node in ("w2", "w3"):
        s = RawSync(channel).send(hello_msg(node, "e1"), end_msg(0, 0))
        s.recv_kind("welcome")
        s.recv_kind("ack")
        held.append(s)
    sync = RawSync(channel).send(hello_msg("w4", "e1"), end_msg(0, 0))
    sync.close()
    code, details = sync.status()
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "3 watchers" in details, (code, details)
    hello = {"instance": str(uuid.uuid4()), "port": 9}
    reply = agg.request("POST", "/hello", json.dumps(hello).encode(), JSON)
    assert reply.status == 429 and "3 watchers" in reply.json()["detail"], reply
    # A real watcher is refused, says so, and gets in once a slot is free.
    folder = tmp_path / "late"
    fill(folder, 3)
    late = start_watcher(folder, agg.grpc_url, name="late")
    wait_for(
        lambda: [e for e in late.proc.events("stream_failed") if "RESOURCE_EXHAUSTED" in e["code"]],
        SYNC_TIMEOUT,
        what="the late watcher to log its refusal",
    )
    held[0].send(pb.WatcherMessage(goodbye=pb.Goodbye())).close()
    assert held[0].status()[0] is grpc.StatusCode.OK
    wait_listed(
        agg,
        "late",
        folder,
        what="the late watcher listed once a slot is free",
        timeout=SYNC_TIMEOUT,
    )

    # Readers: two at once, the third refused; a slot frees when one leaves.
    stub = pb_grpc.FileIndexStub(channel)
    r1, r2 = stub.WatchFiles(pb.WatchFilesRequest()), stub.WatchFiles(pb.WatchFilesRequest())
    next(r1), next(r2)
    with pytest.raises(grpc.RpcError) as info:
        next(stub.WatchFiles(pb.WatchFilesRequest()))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert "2 WatchFiles readers" in (info.value.details() or "")
    r1.cancel()
    wait_for(lambda: agg.metric("filewatch_watch_readers"), 5, until=lambda n: n == 1, what="1")
    r3 = stub.WatchFiles(pb.WatchFilesRequest())
    assert next(r3).WhichOneof("kind") == "list"
    r2.cancel()
    r3.cancel()

    # Body size: 413 with a problem body, with or without a Content-Length.
    op = {"instance": str(uuid.uuid4()), "op": "add", "value": {"filename": "a"}, "seqno": 2}
    big_body = json.dumps([op] * 100).encode()
    assert len(big_body) > 4096
    reply = agg.request("PATCH", "/files", big_body, JSON)
    assert reply.status == 413 and reply.json()["status"] == 413, reply
    reply = _chunked_request(agg.http_port, "/files", big_body * 50)
    assert reply.status == 413, reply

    for s in held[1:]:
        s.cancel()
    growth = (agg.proc.rss_kib() - rss_before) / 1024
    measured("limits: aggregator RSS growth after every refusal", growth, "MiB")
    assert growth < 30
    assert agg.proc.alive


def _chunked_request(port: int, path: str, body: bytes) -> Reply:
    """A PATCH with Transfer-Encoding: chunked (no Content-Length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 8192):
                yield body[i : i + 8192]

        conn.request("PATCH", path, body=chunks(), headers=JSON, encode_chunked=True)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    except (BrokenPipeError, ConnectionResetError):  # refused before we finished sending
        resp = conn.getresponse()
        return Reply(resp.status, {}, resp.read())
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_a_legacy_watcher_over_the_file_limit_is_refused_clearly(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    """Its list cannot be installed: its hellos are answered 429 naming the limit, and it is
    logged and counted; nothing of it is listed and the aggregator carries on."""
    agg = start_aggregator("--max-files-per-watcher", "50", ttl=30.0)
    folder = tmp_path / "big"
    fill(folder, 60)
    w = start_watcher(folder, agg.http_url)
    wait_for(
        lambda: [e for e in w.proc.events("hello_failed") if "429" in str(e.get("error"))],
        SYNC_TIMEOUT,
        what="the watcher to be told 429",
    )
    assert "50 files" in str(w.proc.events("hello_failed")[-1]["error"])
    assert agg.metric("filewatch_ingestion_errors_total", kind="LimitExceededError") >= 1
    assert "Task exception was never retrieved" not in agg.proc.log_text()
    assert agg.files() == []
    # Below the limit again, it is listed at its next hello.
    for name in sorted(os.listdir(folder))[:15]:
        os.unlink(folder / name)
    wait_listed(
        agg,
        f"127.0.0.1:{w.http_port}",
        folder,
        what="listed once under the limit",
        timeout=SYNC_TIMEOUT,
    )


# ---------------------------------------------------------------- the token


@pytest.mark.timeout(60)
def test_with_a_token_ingestion_needs_it_and_reads_stay_open(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    channels: Callable[[str], grpc.Channel],
    tmp_path: Path,
) -> None:
    """--token, and loopback not among the token-less legacy networks."""
    agg = start_aggregator("--token", TOKEN, "--legacy-networks", "10.0.0.0/8", ttl=30.0)
    g_dir, l_dir = tmp_path / "g", tmp_path / "l"
    fill(g_dir, 3, "g")
    fill(l_dir, 3, "l")
    start_watcher(g_dir, agg.grpc_url, "--token", TOKEN, name="g")
    lw = start_watcher(l_dir, agg.http_url, "--token", TOKEN)
    wait_for(
        agg.files,
        SYNC_TIMEOUT,
        until=lambda f: f == folder_names(g_dir, l_dir),
        what="both watchers, with the token",
    )

    channel = channels(agg.grpc_target)
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN[:-1])]):
        sync = RawSync(channel, metadata=metadata).send(hello_msg("intruder", "e"))
        sync.close()
        code, details = sync.status()
        assert code is grpc.StatusCode.UNAUTHENTICATED, (metadata, code, details)
    hello = json.dumps({"instance": str(uuid.uuid4()), "port": 9}).encode()
    for headers in (JSON, {**JSON, "Authorization": "Bearer wrong"}):
        for method, path, body in (
            ("POST", "/hello", hello),
            ("POST", "/bye", json.dumps({"instance": lw.instance}).encode()),
            ("PATCH", "/files", b"[]"),
        ):
            reply = agg.request(method, path, body, headers)
            assert reply.status == 401, (method, path, headers, reply)
            assert reply.json()["detail"]
    # Reads need nothing.
    assert agg.request("GET", "/files/").status == 200
    stub = pb_grpc.FileIndexStub(channel)
    assert len(stub.ListFiles(pb.ListFilesRequest()).files) == 6
    assert next(stub.WatchFiles(pb.WatchFilesRequest())).WhichOneof("kind") == "list"
    assert agg.files() == folder_names(g_dir, l_dir), "nothing changed by the refused requests"


@pytest.mark.timeout(60)
def test_the_token_from_the_environment_and_token_less_loopback_legacy(
    start_aggregator: AggregatorFactory,
    start_watcher: WatcherFactory,
    channels: Callable[[str], grpc.Channel],
    tmp_path: Path,
) -> None:
    """FILEWATCH_TOKEN on both sides; the Go watcher (no token) from loopback is accepted."""
    agg = start_aggregator(ttl=30.0, env={"FILEWATCH_TOKEN": TOKEN})
    folder = tmp_path / "g"
    fill(folder, 3)
    start_watcher(folder, agg.grpc_url, name="g", env={"FILEWATCH_TOKEN": TOKEN})
    wait_for(agg.files, SYNC_TIMEOUT, until=lambda f: f == folder_names(folder), what="listed")
    sync = RawSync(channels(agg.grpc_target)).send(hello_msg("intruder", "e"))
    sync.close()
    assert sync.status()[0] is grpc.StatusCode.UNAUTHENTICATED
    hello = json.dumps({"instance": str(uuid.uuid4()), "port": 9}).encode()
    assert agg.request("POST", "/hello", hello, JSON).status == 200  # no token, loopback
    wrong = {**JSON, "Authorization": "Bearer wrong"}
    assert agg.request("POST", "/hello", hello, wrong).status == 401  # a wrong one is wrong


# ---------------------------------------------------------------- ownership


@pytest.mark.timeout(60)
def test_a_second_live_watcher_with_the_same_name_cannot_take_over(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    agg = start_aggregator(ttl=30.0)
    first, second = tmp_path / "first", tmp_path / "second"
    fill(first, 5, "first")
    fill(second, 5, "second")
    w1 = start_watcher(first, agg.grpc_url, name="same")
    wait_for(agg.files, SYNC_TIMEOUT, until=lambda f: f == folder_names(first))
    w2 = start_watcher(second, agg.grpc_url, name="same")
    refused = w2.proc.wait_event("stream_failed", code="StatusCode.ALREADY_EXISTS")
    assert "--name" in refused["details"], refused
    assert agg.files() == folder_names(first)
    (first / "still-mine.txt").write_text("a")
    wait_for(agg.files, SYNC_TIMEOUT, until=lambda f: f == folder_names(first), what="first")

    # Once the first leaves (goodbye: its files go at once), the second gets the name.
    w1.proc.stop()
    wait_for(
        agg.files,
        SYNC_TIMEOUT,
        until=lambda f: f == folder_names(second),
        what="the second watcher, after the first left",
    )


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request; answers GET /files like a watcher (or with a redirect)."""

    hits: list[tuple[str, str]]
    redirect_to = ""

    def do_GET(self) -> None:
        self.hits.append((self.client_address[0], self.path))
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        body = json.dumps({"instance": "whatever", "files": [], "seqno": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(
    host: str, port: int, redirect_to: str = ""
) -> tuple[http.server.HTTPServer, list[tuple[str, str]]]:
    hits: list[tuple[str, str]] = []
    handler = type("Handler", (_Recorder,), {"hits": hits, "redirect_to": redirect_to})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


@pytest.mark.timeout(60)
def test_a_legacy_instance_answers_only_to_the_address_of_its_hello(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    """bye, PATCH and hello for an instance, from another address: 409, nothing changes."""
    agg = start_aggregator(ttl=30.0)
    folder = tmp_path / "victim"
    fill(folder, 5)
    victim = start_watcher(folder, agg.http_url)
    node = f"127.0.0.1:{victim.http_port}"
    wait_for(lambda: agg.node_files(node), SYNC_TIMEOUT, until=lambda f: f == folder_names(folder))

    remove: list[dict[str, object]] = [
        {"instance": victim.instance, "op": "remove", "value": {"filename": "f00000.txt"}}
    ]
    remove[0]["seqno"] = 99
    for method, path, body in (
        ("PATCH", "/files", json.dumps(remove).encode()),
        ("POST", "/bye", json.dumps({"instance": victim.instance}).encode()),
        ("POST", "/hello", json.dumps({"instance": victim.instance, "port": 1}).encode()),
    ):
        reply = agg.request(method, path, body, JSON, source=OTHER_HOST)
        assert reply.status == 409, (method, path, reply)
        assert "another address" in reply.json()["detail"]
    assert agg.node_files(node) == folder_names(folder)
    (folder / "after.txt").write_text("a")
    wait_for(lambda: agg.node_files(node), SYNC_TIMEOUT, until=lambda f: f == folder_names(folder))


@pytest.mark.timeout(60)
def test_a_forged_hello_for_a_live_legacy_watchers_port_does_not_take_it_over(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    """A hello with a fresh instance and the victim's port: the list fetched from that port
    names the victim's instance, so the hello was not a restart and changes nothing."""
    agg = start_aggregator(ttl=30.0)
    folder = tmp_path / "victim"
    fill(folder, 5)
    victim = start_watcher(folder, agg.http_url)
    node = f"127.0.0.1:{victim.http_port}"
    wait_for(lambda: agg.node_files(node), SYNC_TIMEOUT, until=lambda f: f == folder_names(folder))

    forged = {"instance": str(uuid.uuid4()), "port": victim.http_port}
    agg.request("POST", "/hello", json.dumps(forged).encode(), JSON)
    (folder / "after-the-forgery.txt").write_text("a")
    took = time.monotonic()
    wait_listed(
        agg,
        node,
        folder,
        what="the victim's change, well within the TTL (30 s)",
        timeout=SYNC_TIMEOUT,
    )
    measured("forged legacy hello: victim's next change listed", time.monotonic() - took)


@pytest.mark.timeout(60)
def test_a_hello_makes_the_aggregator_fetch_only_from_its_sender(
    start_aggregator: AggregatorFactory,
    channels: Callable[[str], grpc.Channel],
    tmp_path: Path,
) -> None:
    """Whatever the body, headers or a redirect say, the list comes from the sender's address."""
    agg = start_aggregator(ttl=30.0)
    for _ in range(20):
        port = _free_on_both()
        if port:
            break
    else:
        pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")
    bait, bait_hits = _serve("127.0.0.1", port)
    sender, sender_hits = _serve(OTHER_HOST, port, redirect_to=f"http://127.0.0.1:{port}/files")
    try:
        body = {
            "instance": str(uuid.uuid4()),
            "port": port,
            "host": "127.0.0.1",
            "address": f"127.0.0.1:{port}",
            "url": f"http://127.0.0.1:{port}/files",
        }
        headers = {
            **JSON,
            "Host": f"127.0.0.1:{port}",
            "X-Forwarded-For": "127.0.0.1",
            "X-Real-IP": "127.0.0.1",
            "Forwarded": "for=127.0.0.1",
        }
        reply = agg.request("POST", "/hello", json.dumps(body).encode(), headers, source=OTHER_HOST)
        assert reply.status == 200, reply
        wait_for(lambda: list(sender_hits), SYNC_TIMEOUT, what="the fetch from the sender")
        assert sender_hits[0][1] == "/files"
        # A gRPC hello names a host and a port too: the aggregator never fetches for gRPC.
        sync = RawSync(channels(agg.grpc_target))
        sync.send(hello_msg("named", "e", host="127.0.0.1", http_port=port), end_msg(0, 0))
        sync.recv_kind("welcome")
        sync.recv_kind("ack")
        sync.cancel()
        time.sleep(1.0)  # would a fetch (or a followed redirect) reach the bait? nothing to poll
        assert bait_hits == [], f"the aggregator fetched from a host it was told: {bait_hits}"
    finally:
        for server in (bait, sender):
            server.shutdown()
            server.server_close()


def _free_on_both() -> int:
    with socket.socket() as a:
        a.bind((OTHER_HOST, 0))
        port: int = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port))
            except OSError:
                return 0
    return port
