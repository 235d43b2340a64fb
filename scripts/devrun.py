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
ORDER = ("aggregator", "watcher1", "watcher2")


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


def _spawn(name: str, args: list[str]) -> subprocess.Popen[bytes]:
    log = open(RUN / f"{name}.log", "wb")  # noqa: SIM115 (handed to the child; fresh each run)
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
    log.close()
    (RUN / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def _last_line(name: str) -> str:
    """The last line a child wrote: a child that cannot start says why there, in one line."""
    lines = (RUN / f"{name}.log").read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _wait_healthy(procs: dict[str, tuple[subprocess.Popen[bytes], str]], timeout: float) -> bool:
    """Poll until every child answers /healthz; False (said why) if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = dict(procs)
    while pending:
        for name, (proc, url) in list(pending.items()):
            if proc.poll() is not None:  # reaped: a dead child never looks alive
                print(f"{name} exited ({proc.returncode}): {_last_line(name)}", file=sys.stderr)
                return False
            if _healthy(url):
                del pending[name]
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            print(f"not answering after {timeout:.0f} s: {names}; see .run/*.log", file=sys.stderr)
            return False
        time.sleep(0.05)
    return True


def start(aggregator_address: str) -> int:
    """Start the aggregator, wait until it answers, then the two watchers (no failed first try)."""
    RUN.mkdir(exist_ok=True)
    for name in ORDER:
        pid = _pid(name)
        if pid is not None and _alive(pid):
            print(f"{name} already running (pid {pid}); run 'make stop' first", file=sys.stderr)
            return 1
    http_args = [a for address in AGGREGATOR_HTTP for a in ("--http", address)]
    aggregator = _spawn("aggregator", ["-m", "aggregator", *http_args, "--grpc", AGGREGATOR_GRPC])
    if not _wait_healthy({"aggregator": (aggregator, f"http://{AGGREGATOR_HTTP[0]}/healthz")}, 30):
        stop()
        return 1
    watchers = {}
    for name, folder, port in WATCHERS:
        argv = [
            "-m",
            "watcher",
            f"-dir={folder}",
            f"-p={port}",
            f"-aggregator={aggregator_address}",
        ]
        watchers[name] = (_spawn(name, argv), f"http://127.0.0.1:{port}/healthz")
    if not _wait_healthy(watchers, 30):
        stop()
        return 1
    print("filewatch is running:")
    print(f"  live page:        http://localhost:{AGGREGATOR_HTTP[1].split(':')[1]}/")
    print(f"  files (browser):  http://localhost:{AGGREGATOR_HTTP[1].split(':')[1]}/files/")
    print(f"  files (original): http://{AGGREGATOR_HTTP[0]}/files/")
    print(f"  gRPC:             {AGGREGATOR_GRPC}  (grpcurl -plaintext {AGGREGATOR_GRPC} list)")
    print(f"  metrics:          http://{AGGREGATOR_HTTP[0]}/metrics")
    for name, folder, port in WATCHERS:
        print(f"  {name}:         http://127.0.0.1:{port}/files  ({folder})")
    print("  logs: .run/*.log   stop: make stop")
    return 0


def _terminate(names: list[str], timeout: float = 10.0) -> None:
    """SIGTERM the PIDs of `names` at once, wait for all (bounded), SIGKILL stragglers."""
    running = {}
    for name in names:
        pid = _pid(name)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            running[name] = pid
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        for name, pid in list(running.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child (a failed start): reap it
            if not _alive(pid):
                print(f"stopped {name} (pid {pid})")
                del running[name]
        time.sleep(0.02)
    for name, pid in running.items():
        print(
            f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f} s; sending SIGKILL",
            file=sys.stderr,
        )
        os.kill(pid, signal.SIGKILL)
    for name in names:
        (RUN / f"{name}.pid").unlink(missing_ok=True)


def stop() -> int:
    """SIGTERM exactly the PIDs in .run/: the watchers together (their goodbye reaches the
    aggregator), then the aggregator."""
    _terminate([name for name, _, _ in WATCHERS])
    _terminate(["aggregator"])
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
