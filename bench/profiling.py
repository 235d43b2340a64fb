"""py-spy attached to a running process while a scenario measures, and the top of its profile.

Profiles come from a second, profiled run of a missed scenario, never from the
run whose figures are reported: the sampler takes CPU from a small machine.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import BenchError, stop_proc

RATE = 200
TOP = 20


def pyspy_path() -> str | None:
    """The py-spy executable next to our Python, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class PySpy:
    """`py-spy record --pid PID` (non-blocking, by function) into a raw collapsed-stack file."""

    def __init__(self, pid: int, out: Path, rate: int = RATE) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = out.with_suffix(".log")
        self._t0 = 0.0

    def start(self) -> None:
        """Attach; returns once py-spy samples (raises BenchError if it cannot)."""
        exe = pyspy_path()
        if exe is None:
            raise BenchError("py-spy is not installed (pip install py-spy)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--nonblocking",
            "--function", "--format", "raw", "--output", str(self.out),
        ]  # fmt: skip
        deadline = time.monotonic() + 10
        text = ""
        # A process spawned a moment ago has no interpreter to find yet: try again.
        for _ in range(500):
            with self._log.open("wb") as log:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            while b"Sampling process" not in self._log.read_bytes():
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            else:
                self._t0 = time.monotonic()
                return
            text = self._log.read_text(errors="replace")
            stop_proc(self._proc, signal.SIGINT)
            if time.monotonic() > deadline:
                break
        raise BenchError(f"py-spy did not attach to {self.pid}: {text[-500:]}")

    def stop(self) -> dict[str, Any]:
        """Stop sampling (SIGINT makes py-spy write its file); the summary of the profile."""
        seconds = time.monotonic() - self._t0
        if self._proc is not None:
            stop_proc(self._proc, signal.SIGINT)
        if not self.out.exists():
            return {"error": f"py-spy wrote nothing: {self._log.read_text(errors='replace')}"}
        summary = summarize_raw(self.out)
        summary["seconds"] = round(seconds, 2)
        summary["file"] = str(self.out)
        return summary


def summarize_raw(path: Path, top: int = TOP) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    project = collections.Counter(
        {
            f: n
            for f, n in inclusive.items()
            if f.split(" (", 1)[-1].startswith(PROJECT) and not f.startswith(("<module>", "main ("))
        }
    )

    def rows(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[f, n, round(100 * n / total, 1)] for f, n in counter.most_common(top)]

    return {
        "samples": total,
        "self": rows(own) if total else [],
        "inclusive_project": rows(project) if total else [],
    }


PROJECT = ("aggregator/", "watcher/", "common/", "gen/")
"""Frames of our own code (py-spy names them relative to sys.path)."""


def explain(frame: str) -> str:
    """A hint for frames whose names say little."""
    if frame.startswith("<lambda> (<string>:1)"):
        return "  [likely a NamedTuple __new__: Change, Entry, Event...]"
    if frame.startswith("Thread.run (threading.py"):
        return "  [a non-loop thread: grpc.aio's poller, watchdog's observer...]"
    if frame.startswith("__create_fn__"):
        return "  [a dataclass's generated method]"
    return ""
