"""The shared token read from a file: ingestion guarded, the secret off command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    WatcherFactory,
    fill,
    folder_names,
)
from tests.support import http_request, wait_for

TOKEN = "s3cret-from-a-file"  # noqa: S105 - the tests' own shared token


@pytest.mark.timeout(60)
def test_a_token_file_on_both_sides_syncs_and_a_watcher_without_it_is_refused(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")  # as `echo` writes it: the newline is not the token
    token_file.chmod(0o600)
    # Loopback is not among the token-less legacy networks: both protocols need the token.
    agg = start_aggregator(
        "--token-file", str(token_file), "--legacy-networks", "10.0.0.0/8", ttl=30.0
    )
    g_dir, l_dir, intruder_dir = tmp_path / "g", tmp_path / "l", tmp_path / "intruder"
    fill(g_dir, 3, "g")
    fill(l_dir, 2, "l")
    fill(intruder_dir, 2, "intruder")
    g = start_watcher(g_dir, agg.grpc_url, "--token-file", str(token_file), name="g")
    legacy = start_watcher(l_dir, agg.http_url, env={"FILEWATCH_TOKEN_FILE": str(token_file)})
    wait_for(
        agg.files,
        SYNC_TIMEOUT,
        until=lambda f: f == folder_names(g_dir, l_dir),
        what="both watchers, with the token from the file",
    )
    for proc in (agg.proc, g.proc, legacy.proc):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline, (proc.role, cmdline)

    intruder = start_watcher(intruder_dir, agg.grpc_url, name="intruder")
    refused = intruder.proc.wait_event("stream_failed", code="StatusCode.UNAUTHENTICATED")
    assert refused["refused"] is True, refused
    reply = wait_for(
        lambda: http_request(intruder.http_port, "GET", "/healthz"),
        SYNC_TIMEOUT,
        until=lambda r: r.status == 503,
        what="the refused watcher reporting itself failing",
    )
    assert reply.json()["reason"].startswith("UNAUTHENTICATED: "), reply
    assert agg.files() == folder_names(g_dir, l_dir), "nothing of the refused watcher's"
