"""A process that cannot start says why in one line and exits non-zero (real processes).

`make run` prints that line as the reason it failed, so it must name the address.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support import HOST, ROOT

LABEL = {"http": "HTTP", "grpc": "gRPC"}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((HOST, 0))
        holder.listen()
        yield holder.getsockname()[1]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        # Hermetic: no flag twins from the caller's environment.
        env={k: v for k, v in os.environ.items() if not k.startswith("FILEWATCH_")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_the_aggregator_on_a_taken_port_prints_one_line_and_exits_non_zero(
    taken_port: int, which: str
) -> None:
    address = f"{HOST}:{taken_port}"
    ports = {"http": f"{HOST}:0", "grpc": f"{HOST}:0", which: address}
    done = run("-m", "aggregator", "--http", ports["http"], "--grpc", ports["grpc"])
    assert done.returncode == 1, done
    expected = f"aggregator: cannot listen on {address} ({LABEL[which]}): Address already in use"
    assert done.stderr.strip().splitlines() == [expected], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_the_watcher_on_a_taken_port_prints_one_line_and_exits_non_zero(taken_port: int) -> None:
    done = run("-m", "watcher", f"-dir={ROOT / 'sample-folders' / 'folder1'}", f"-p={taken_port}")
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{taken_port}" in lines[0], done.stderr
