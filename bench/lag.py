"""End-to-end lag: a file created on disk -> visible in GET /files/, over gRPC and the legacy path.

Starts a real aggregator and one real watcher per protocol (subprocesses on
loopback), creates files one at a time, and polls `GET /files/` until each
appears. Prints p50 / p90 / p99 / max per protocol and the ratio.

    python bench/lag.py [--trials 20] [--background 0] [--protocol grpc,legacy] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _wait_log(path: Path, event: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if f'"{event}"' in line:
                    record: dict[str, Any] = json.loads(line)
                    if record.get("event") == event:
                        return record
        time.sleep(0.02)
    raise TimeoutError(f"no {event} in {path}:\n{path.read_text() if path.exists() else ''}")


class Procs:
    """Subprocesses started here, stopped by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _files_contains(conn: http.client.HTTPConnection, needle: bytes) -> bool:
    conn.request("GET", "/files/")
    resp = conn.getresponse()
    return needle in resp.read()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(protocol: str, trials: int, background: int, workdir: Path) -> list[float]:
    """Lags in milliseconds of `trials` creations through one protocol."""
    procs = Procs()
    folder = workdir / f"folder-{protocol}"
    folder.mkdir()
    for i in range(background):
        (folder / f"bg-{i:07d}").write_bytes(b"")
    try:
        agg_log = workdir / f"agg-{protocol}.log"
        agg_args = ["-m", "aggregator", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"]
        procs.start([*agg_args, "--log-format", "json"], agg_log)
        started = _wait_log(agg_log, "aggregator_started")
        http_port = int(started["http"][0].rsplit(":", 1)[1])
        target = (
            f"grpc://{started['grpc']}" if protocol == "grpc" else f"http://127.0.0.1:{http_port}"
        )
        w_log = workdir / f"watcher-{protocol}.log"
        procs.start(
            [
                "-m",
                "watcher",
                f"-dir={folder}",
                "-p=0",
                f"-aggregator={target}",
                "--log-format",
                "json",
            ],
            w_log,
        )
        _wait_log(w_log, "watcher_started")
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        # Wait until the initial list (background files + nothing else) is in.
        deadline = time.monotonic() + 60
        probe = b'"bg-%07d"' % (background - 1) if background else b'"files"'
        while not _files_contains(conn, probe):
            if time.monotonic() > deadline:
                raise TimeoutError("initial list never arrived")
            time.sleep(0.01)
        lags = []
        for i in range(trials):
            name = f"lag-{i:05d}.txt"
            needle = json.dumps(name).encode()
            t0 = time.perf_counter()
            (folder / name).write_bytes(b"x")
            while not _files_contains(conn, needle):
                if time.perf_counter() - t0 > 10:
                    raise TimeoutError(f"{name} never appeared")
            lags.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)  # let the stream go idle again: this measures one change at a time
        conn.close()
        return lags
    finally:
        procs.stop_all()


def main() -> int:
    """Run the lag scenarios and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--background", type=int, default=0, help="other files listed")
    parser.add_argument("--protocol", default="grpc,legacy")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    ns = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="filewatch-bench-") as tmp:
        for protocol in ns.protocol.split(","):
            lags = measure(protocol, ns.trials, ns.background, Path(tmp))
            results[protocol] = {
                "p50_ms": statistics.median(lags),
                "p90_ms": percentile(lags, 0.9),
                "p99_ms": percentile(lags, 0.99),
                "max_ms": max(lags),
                "trials": len(lags),
            }
    print(
        f"end-to-end lag, file created -> in GET /files/ ({ns.trials} trials, "
        f"{ns.background} other files; {os.cpu_count()} CPUs, Python {sys.version.split()[0]})"
    )
    print(f"{'protocol':10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for protocol, r in results.items():
        row = [r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
        print(f"{protocol:10} " + " ".join(f"{v:8.2f}" for v in row))
    if "grpc" in results and "legacy" in results:
        ratio = results["grpc"]["p50_ms"] / results["legacy"]["p50_ms"]
        print(f"p50 ratio grpc/legacy: {ratio:.2f}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
