"""`make run` / `make stop`: start the aggregator and two watchers, and stop exactly those.

Standard library only, so that `make stop` works with any Python. PIDs go to
.run/*.pid and logs to .run/*.log. Only PIDs written here are ever signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
AGGREGATOR_HTTP = ("127.0.0.1:8000", "127.0.0.1:12345")
AGGREGATOR_GRPC = "127.0.0.1:50051"
WATCHERS = (
    ("watcher1", "sample-folders/folder1", 4000),
    ("watcher2", "sample-folders/folder2", 4001),
)
ORDER = (
    "watcher1",
    "watcher2",
    "aggregator",
)  # watchers first: their goodbye reaches the aggregator


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(name: str) -> int | None:
    path = RUN / f"{name}.pid"
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _healthy(url: str) -> bool:
    """The process answers /healthz, and a watcher's stream to the aggregator is live."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (our own loopback URL)
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return False
    return bool(body.get("status") == "ok" and body.get("stream", "live") == "live")


def _spawn(name: str, args: list[str]) -> None:
    log = open(RUN / f"{name}.log", "ab")  # noqa: SIM115 (handed to the child)
    env = {**os.environ, "FILEWATCH_LOG_FORMAT": os.environ.get("FILEWATCH_LOG_FORMAT", "kv")}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # not killed with the make that started it
    )
    (RUN / f"{name}.pid").write_text(f"{proc.pid}\n")


def start(aggregator_address: str) -> int:
    """Start all three (or only what is not running yet) and wait until they answer."""
    RUN.mkdir(exist_ok=True)
    for name in ORDER:
        pid = _pid(name)
        if pid is not None and _alive(pid):
            print(f"{name} already running (pid {pid}); run 'make stop' first", file=sys.stderr)
            return 1
    http_args = [a for address in AGGREGATOR_HTTP for a in ("--http", address)]
    _spawn("aggregator", ["-m", "aggregator", *http_args, "--grpc", AGGREGATOR_GRPC])
    checks = {"aggregator": f"http://{AGGREGATOR_HTTP[0]}/healthz"}
    for name, folder, port in WATCHERS:
        _spawn(
            name,
            ["-m", "watcher", f"-dir={folder}", f"-p={port}", f"-aggregator={aggregator_address}"],
        )
        checks[name] = f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + 30
    pending = dict(checks)
    while pending and time.monotonic() < deadline:
        for name, url in list(pending.items()):
            pid = _pid(name)
            if pid is None or not _alive(pid):
                print(f"{name} exited; see .run/{name}.log", file=sys.stderr)
                stop()
                return 1
            if _healthy(url):
                del pending[name]
        time.sleep(0.1)
    if pending:
        print(f"not answering after 30 s: {', '.join(pending)}; see .run/*.log", file=sys.stderr)
        stop()
        return 1
    print("filewatch is running:")
    print(f"  files (browser):  http://localhost:{AGGREGATOR_HTTP[1].split(':')[1]}/files/")
    print(f"  files (original): http://{AGGREGATOR_HTTP[0]}/files/")
    print(f"  gRPC:             {AGGREGATOR_GRPC}  (grpcurl -plaintext {AGGREGATOR_GRPC} list)")
    print(f"  metrics:          http://{AGGREGATOR_HTTP[0]}/metrics")
    for name, folder, port in WATCHERS:
        print(f"  {name}:         http://127.0.0.1:{port}/files  ({folder})")
    print("  logs: .run/*.log   stop: make stop")
    return 0


def stop() -> int:
    """SIGTERM exactly the PIDs in .run/, wait for each (bounded), then SIGKILL stragglers."""
    for name in ORDER:
        pid = _pid(name)
        if pid is None:
            continue
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.05)
            if _alive(pid):
                print(
                    f"{name} (pid {pid}) ignored SIGTERM for 10 s; sending SIGKILL", file=sys.stderr
                )
                os.kill(pid, signal.SIGKILL)
            print(f"stopped {name} (pid {pid})")
        (RUN / f"{name}.pid").unlink(missing_ok=True)
    return 0


def main() -> int:
    """Dispatch start/stop."""
    parser = argparse.ArgumentParser(prog="devrun")
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start")
    start_p.add_argument("--aggregator-address", default=f"grpc://{AGGREGATOR_GRPC}")
    sub.add_parser("stop")
    ns = parser.parse_args()
    if ns.command == "start":
        return start(ns.aggregator_address)
    return stop()


if __name__ == "__main__":
    sys.exit(main())
