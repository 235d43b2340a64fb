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
HOST = "127.0.0.1"
AGGREGATOR_HTTP = (8000, 12345)
AGGREGATOR_GRPC = 50051
REPLICA_PORT_STEP = 1
"""Replica k (from 0) listens on each of the first one's ports + k * this."""
MAX_REPLICAS = 9
WATCHERS = (
    ("watcher1", "sample-folders/folder1", 4000),
    ("watcher2", "sample-folders/folder2", 4001),
)


def _replica(k: int) -> tuple[str, tuple[str, str], str]:
    """Name, HTTP addresses and gRPC address of replica k (0 is `aggregator`)."""
    step = k * REPLICA_PORT_STEP
    name = "aggregator" if k == 0 else f"aggregator{k + 1}"
    http = (f"{HOST}:{AGGREGATOR_HTTP[0] + step}", f"{HOST}:{AGGREGATOR_HTTP[1] + step}")
    return name, http, f"{HOST}:{AGGREGATOR_GRPC + step}"


def _names() -> list[str]:
    """Every process name this script may have started (replicas 2.. only if PID files say so)."""
    replicas = sorted(p.stem for p in RUN.glob("aggregator*.pid")) if RUN.exists() else []
    return sorted({"aggregator", *replicas}) + [name for name, _, _ in WATCHERS]


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


def start(aggregator_address: str, replicas: int = 1) -> int:
    """Start the aggregators, wait until they answer, then the two watchers (no failed first
    try). With several replicas, each watcher streams to every one of them."""
    if not 1 <= replicas <= MAX_REPLICAS:
        print(f"REPLICAS must be 1 to {MAX_REPLICAS}, got {replicas}", file=sys.stderr)
        return 2
    if replicas > 1 and not aggregator_address.startswith("grpc://"):
        print("REPLICAS=2 or more needs gRPC watchers (the legacy protocol reports to one "
              "aggregator); drop AGGREGATOR_ADDRESS", file=sys.stderr)  # fmt: skip
        return 2
    RUN.mkdir(exist_ok=True)
    for name in _names():
        pid = _pid(name)
        if pid is not None and _alive(pid):
            print(f"{name} already running (pid {pid}); run 'make stop' first", file=sys.stderr)
            return 1
    aggregators = {}
    for k in range(replicas):
        name, http, grpc_address = _replica(k)
        http_args = [a for address in http for a in ("--http", address)]
        proc = _spawn(name, ["-m", "aggregator", *http_args, "--grpc", grpc_address])
        aggregators[name] = (proc, f"http://{http[0]}/healthz")
    if not _wait_healthy(aggregators, 30):
        stop()
        return 1
    targets = aggregator_address
    if replicas > 1:
        targets = ",".join(f"grpc://{_replica(k)[2]}" for k in range(replicas))
    watchers = {}
    for name, folder, port in WATCHERS:
        argv = ["-m", "watcher", f"-dir={folder}", f"-p={port}", f"-aggregator={targets}"]
        watchers[name] = (_spawn(name, argv), f"http://{HOST}:{port}/healthz")
    if not _wait_healthy(watchers, 30):
        stop()
        return 1
    print("filewatch is running:")
    for k in range(replicas):
        name, http, grpc_address = _replica(k)
        browser = http[1].split(":")[1]
        if replicas > 1:
            print(f"  {name}:")
        print(f"  live page:        http://localhost:{browser}/")
        print(f"  files (browser):  http://localhost:{browser}/files/")
        print(f"  files (original): http://{http[0]}/files/")
        print(f"  gRPC:             {grpc_address}  (grpcurl -plaintext {grpc_address} list)")
        print(f"  metrics:          http://{http[0]}/metrics")
    for name, folder, port in WATCHERS:
        print(f"  {name}:         http://{HOST}:{port}/files  ({folder})")
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
    _terminate([name for name in _names() if name.startswith("aggregator")])
    return 0


def main() -> int:
    """Dispatch start/stop."""
    parser = argparse.ArgumentParser(prog="devrun")
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start")
    start_p.add_argument("--aggregator-address", default=f"grpc://{HOST}:{AGGREGATOR_GRPC}")
    start_p.add_argument("--replicas", type=int, default=1)
    sub.add_parser("stop")
    ns = parser.parse_args()
    if ns.command == "start":
        return start(ns.aggregator_address, ns.replicas)
    return stop()


if __name__ == "__main__":
    sys.exit(main())
