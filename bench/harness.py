"""What every scenario shares: real processes, /proc readings, HTTP polling, statistics, results.

Every child is `sys.executable -m ...` on 127.0.0.1 with port 0, its output in
a log file, its ports read from its JSON "started" line. Children are stopped
by PID only (SIGTERM, a bounded wait, then SIGKILL), last started first.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from watcher.config import WatcherConfig

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A scenario could not run (a process died, a wait timed out)."""


def say(message: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    """1000 -> 1k, 100000 -> 100k, 1000000 -> 1M."""
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale and n % scale == 0:
            return f"{int(n // scale)}{unit}"
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------- one event loop

_runner: asyncio.Runner | None = None


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the run's one event loop (grpc.aio must not see a second loop)."""
    global _runner  # noqa: PLW0603 (one loop per process, on purpose)
    if _runner is None:
        _runner = asyncio.Runner()
    return _runner.run(coro)


def close_async() -> None:
    """Close the run's event loop (at the very end)."""
    global _runner  # noqa: PLW0603
    if _runner is not None:
        _runner.close()
        _runner = None


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Every knob of the run; FULL is the issue's sizes, QUICK a smoke run."""

    lag_trials: int = 200
    lag_background: int = 100_000
    cost_changes: int = 1000
    """Changes paced one at a time while the CPU per change is measured (lag_*)."""
    cost_idle: float = 3.0
    """Seconds of idle CPU measured before them, to subtract."""
    churn_watchers: int = 10
    churn_rate: int = 500
    churn_seconds: float = 60.0
    churn_seed: int = 600
    ingest_writers: int = 4
    ingest_batches: int = 100
    ingest_batch_size: int = 1000
    ingest_background: int = 100_000
    small_streams: int = 100
    small_batches: int = 1000
    small_readers: int = 10
    subscriber_counts: tuple[int, ...] = (100, 1000)
    subscriber_window: float = 10.0
    read_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    read_after_sizes: tuple[int, ...] = (100_000, 1_000_000)
    read_samples: int = 200
    read_series_seconds: float = 10.0
    read_clients: int = 4
    read_rps_seconds: float = 5.0
    after_change_trials: int = 40
    after_change_seconds: float = 60.0
    move_rounds: int = 60
    memory_files: int = 1_000_000
    startup_files: int = 100_000
    startup_trials: int = 5
    many_streams: int = 1000
    many_window: float = 20.0
    heartbeat_interval: float = WatcherConfig().heartbeat_interval  # the watcher's default
    settle: float = 2.0
    """Seconds a process is left alone before its memory or idle CPU is read."""


FULL = Sizes()
QUICK = Sizes(
    lag_trials=5,
    lag_background=1000,
    cost_changes=100,
    cost_idle=0.5,
    churn_watchers=2,
    churn_rate=100,
    churn_seconds=2.0,
    churn_seed=60,
    ingest_writers=2,
    ingest_batches=5,
    ingest_batch_size=200,
    ingest_background=1000,
    small_streams=10,
    small_batches=50,
    small_readers=2,
    subscriber_counts=(5,),
    subscriber_window=1.0,
    read_sizes=(1000, 2000, 5000),
    read_after_sizes=(2000, 5000),
    read_samples=5,
    read_series_seconds=2.0,
    read_clients=2,
    read_rps_seconds=0.5,
    after_change_trials=3,
    after_change_seconds=5.0,
    move_rounds=3,
    memory_files=1000,
    startup_files=1000,
    startup_trials=2,
    many_streams=20,
    many_window=1.0,
    heartbeat_interval=0.5,
    settle=0.3,
)


# ---------------------------------------------------------------- results


@dataclass
class Check:
    """One target of the issue and the figure measured for it."""

    what: str
    value: float | None
    limit: float
    unit: str
    op: str = "<="
    status: str = ""

    def judge(self, quick: bool) -> None:
        """Set `status`: met / MISSED, or why it is not judged."""
        if self.value is None or math.isnan(self.value):
            self.status = "no figure"
        elif quick:
            self.status = "not judged (quick sizes)"
        else:
            ok = self.value <= self.limit if self.op == "<=" else self.value >= self.limit
            self.status = "met" if ok else "MISSED"

    def line(self) -> str:
        """`what: value (target op limit): status`."""
        value = "n/a" if self.value is None else f"{self.value:,.4g}"
        return (
            f"{self.what}: {value} {self.unit} (target {self.op} {self.limit:,.4g} {self.unit}): "
            f"{self.status}"
        )

    def as_json(self) -> dict[str, Any]:
        """The check as JSON."""
        return {
            "what": self.what,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "status": self.status,
        }


@dataclass
class Table:
    """Rows of figures under column names."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    caption: str = ""


@dataclass
class ScenarioResult:
    """Everything one scenario measured."""

    name: str
    title: str
    target: str
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """error / MISSED / met / reported / not judged."""
        if self.error:
            return "error"
        statuses = [c.status for c in self.checks]
        if "MISSED" in statuses:
            return "MISSED"
        if any(s.startswith("not judged") for s in statuses):
            return "not judged (quick sizes)"
        if statuses and all(s == "met" for s in statuses):
            return "met"
        if "no figure" in statuses:
            return "no figure"
        return "reported"


# ---------------------------------------------------------------- statistics


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99, max of a sample."""
    if not values:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan,
                "max": math.nan}  # fmt: skip
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "p50": quantile(values, 0.5),
        "p90": quantile(values, 0.9),
        "p99": quantile(values, 0.99),
        "max": max(values),
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when undefined."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


# ---------------------------------------------------------------- /proc


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise BenchError(f"no {name} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in bytes."""
    return _status_field(pid, "VmRSS")


def hwm_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    return _status_field(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuWindow:
    """CPU used by some processes between `start()` and `stop()`, as % of one core."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._cpu0: list[float] = []
        self._t0 = 0.0
        self.percent: list[float] = []
        self.seconds = 0.0

    def start(self) -> None:
        """Open the window."""
        self._cpu0 = [cpu_seconds(p) for p in self.pids]
        self._t0 = time.monotonic()

    def stop(self) -> list[float]:
        """Close the window; returns each process's CPU % of one core."""
        cpu1 = [cpu_seconds(p) for p in self.pids]
        self.seconds = time.monotonic() - self._t0
        self.percent = [
            100.0 * (b - a) / self.seconds for a, b in zip(self._cpu0, cpu1, strict=True)
        ]
        return self.percent


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    steal = int(fields[7]) if len(fields) > 7 else 0
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root` and its descendants, reaped children included."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        # utime, stime, cutime, cstime: fields 14-17.
        times[pid] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    ours = {root}
    for _ in range(64):  # bounded depth
        more = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        if not more:
            break
        ours |= more
    return sum(times.get(pid, 0.0) for pid in ours)


class MachineLoad:
    """CPU the machine spent on processes other than ours (and stolen by its hypervisor).

    Busy time (user + nice + system, /proc/stat) minus the CPU of this process
    and its descendants, over a window, as a percentage of one core. Other
    load means the figures of that window are disturbed.
    """

    def __init__(self) -> None:
        self._t0 = 0.0
        self._busy0 = self._steal0 = self._ours0 = 0.0

    def start(self) -> None:
        """Open the window."""
        self._t0 = time.monotonic()
        self._busy0, self._steal0 = _machine_cpu()
        self._ours0 = _tree_cpu(os.getpid())

    def stop(self) -> dict[str, float]:
        """Close the window: other processes' and stolen CPU, % of one core."""
        seconds = max(time.monotonic() - self._t0, 1e-6)
        busy, steal = _machine_cpu()
        ours = _tree_cpu(os.getpid())
        other = max(0.0, (busy - self._busy0) - (ours - self._ours0))
        return {
            "seconds": seconds,
            "other_cpu_percent": 100 * other / seconds,
            "steal_percent": 100 * (steal - self._steal0) / seconds,
        }


def wait_quiet(threshold: float, max_wait: float, sample: float = 2.0) -> dict[str, float]:
    """Wait (at most `max_wait` s) until other processes use under `threshold` % of a core."""
    waited = 0.0
    last: dict[str, float] = {}
    while True:
        load = MachineLoad()
        load.start()
        time.sleep(sample)
        last = load.stop()
        if last["other_cpu_percent"] < threshold or waited >= max_wait:
            return {"waited_seconds": waited, **last}
        if not waited:
            say(f"other processes use {last['other_cpu_percent']:.0f} % of a core: waiting")
        waited += sample


# ---------------------------------------------------------------- processes


def child_env() -> dict[str, str]:
    """Our environment without flag twins or telemetry endpoints: runs are hermetic."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEWATCH_", "OTEL_EXPORTER"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    """One child process and its log."""

    role: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _offset: int = 0
    _events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether it still runs."""
        return self.popen.poll() is None

    def events(self) -> list[dict[str, Any]]:
        """Its JSON log lines so far (read incrementally)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        self._events.append(item)
        return self._events

    def find(self, event: str) -> dict[str, Any] | None:
        """The first log line of `event`, if any."""
        return next((e for e in self.events() if e.get("event") == event), None)

    def wait_event(self, event: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll the log for `event`; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event)
            if found is not None:
                return found
            if not self.alive:
                raise BenchError(
                    f"{self.role} (pid {self.pid}) exited {self.popen.returncode} before "
                    f"logging {event}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{self.role} did not log {event} in {timeout} s:\n{self.tail()}")
            time.sleep(0.01)

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        text = self.log_path.read_bytes().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def stop_proc(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int | None:
    """Stop one child by PID: `sig`, a bounded wait, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
    return proc.returncode


class Procs:
    """The children of one scenario, stopped by PID, last started first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(self, role: str, args: Sequence[str], *, script: bool = False) -> Proc:
        """Start `python -m ...` (or `python script ...`) with its output in a log file."""
        argv = [sys.executable, *args]
        log_path = self.log_dir / f"{len(self.procs):03d}-{role}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT if script else self.log_dir,
                env=child_env(),
                start_new_session=True,  # our signals only, never the terminal's
            )
        proc = Proc(role, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> int | None:
        """Stop one child (SIGTERM, bounded wait, SIGKILL)."""
        return stop_proc(proc.popen)

    def stop_all(self) -> None:
        """Stop every child still running, last started first."""
        for proc in reversed(self.procs):
            stop_proc(proc.popen)


@dataclass
class AggregatorProc:
    """A running aggregator and what it bound."""

    proc: Proc
    http_port: int
    grpc_target: str

    @property
    def pid(self) -> int:
        """Its PID."""
        return self.proc.pid

    @property
    def grpc_url(self) -> str:
        """grpc://HOST:PORT, for a watcher's -aggregator."""
        return f"grpc://{self.grpc_target}"

    @property
    def http_url(self) -> str:
        """http://HOST:PORT, for a legacy watcher's -aggregator."""
        return f"http://{HOST}:{self.http_port}"


def start_aggregator(procs: Procs, role: str, extra: Sequence[str] = ()) -> AggregatorProc:
    """`python -m aggregator` on port 0; returns once it logged aggregator_started."""
    args = ["-m", "aggregator", "--http", f"{HOST}:0", "--grpc", f"{HOST}:0"]
    proc = procs.spawn(role, [*args, "--log-format", "json", *extra])
    started = proc.wait_event("aggregator_started")
    http_port = int(str(started["http"][0]).rsplit(":", 1)[1])
    return AggregatorProc(proc, http_port, str(started["grpc"]))


@dataclass
class WatcherProc:
    """A running watcher."""

    proc: Proc
    http_port: int
    started: dict[str, Any]

    @property
    def pid(self) -> int:
        """Its PID."""
        return self.proc.pid


def spawn_watcher(
    procs: Procs, role: str, folder: Path, aggregator: str, extra: Sequence[str] = ()
) -> Proc:
    """`python -m watcher -dir=... -p=0 -aggregator=...`, not waited for."""
    args = ["-m", "watcher", f"-dir={folder}", "-p=0", f"-aggregator={aggregator}"]
    return procs.spawn(role, [*args, "--log-format", "json", *extra])


def start_watcher(
    procs: Procs, role: str, folder: Path, aggregator: str, extra: Sequence[str] = ()
) -> WatcherProc:
    """A watcher; returns once it logged watcher_started."""
    proc = spawn_watcher(procs, role, folder, aggregator, extra)
    started = proc.wait_event("watcher_started")
    return WatcherProc(proc, int(str(started["http"]).rsplit(":", 1)[1]), started)


def make_folder(path: Path, count: int, prefix: str = "bg") -> Path:
    """A folder holding `count` empty files named PREFIX-0000000."""
    path.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT
    for i in range(count):
        os.close(os.open(path / f"{prefix}-{i:07d}", flags, 0o644))
    return path


# ---------------------------------------------------------------- HTTP


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    """GET http://127.0.0.1:port/path -> (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def healthz(port: int) -> dict[str, Any]:
    """The aggregator's /healthz."""
    status, _, body = http_get(port, "/healthz")
    if status != 200:
        raise BenchError(f"/healthz answered {status}")
    result: dict[str, Any] = json.loads(body)
    return result


def metric_total(port: int, name: str) -> float:
    """The sum of every series of one metric in /metrics (e.g. all ops of a counter)."""
    _, _, body = http_get(port, "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram(port: int, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of one Prometheus histogram series in /metrics."""
    _, _, body = http_get(port, "/metrics")
    out: dict[float, float] = {}
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in body.decode().splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        series, _, value = line.rpartition(" ")
        if all(w in series for w in wanted):
            le = series.split('le="', 1)[1].split('"', 1)[0]
            out[math.inf if le == "+Inf" else float(le)] = float(value)
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over the observations between two scrapes (NaN if none)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return math.nan
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def wait_file_count(
    port: int, count: int, timeout: float, interval: float = 0.005, proc: Proc | None = None
) -> float:
    """Poll the aggregator's /healthz until it holds `count` files; the monotonic time then."""
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        while True:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            files = json.loads(resp.read())["files"]
            if files == count:
                return time.monotonic()
            if proc is not None and not proc.alive:
                raise BenchError(f"{proc.role} exited; aggregator holds {files} files")
            if time.monotonic() > deadline:
                raise BenchError(f"aggregator holds {files} files, not {count}, after {timeout} s")
            time.sleep(interval)
    finally:
        conn.close()


class FilesPoller:
    """Polls GET /files/ on one keep-alive connection with If-None-Match.

    An unchanged list costs a 304; a changed one is read whole, as any reader
    would read it. `body` is the last list received.
    """

    def __init__(self, port: int, path: str = "/files/") -> None:
        self._conn = http.client.HTTPConnection(HOST, port, timeout=60)
        self._path = path
        self._etag = ""
        self.body = b""
        self.requests = 0

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def poll(self) -> bool:
        """One request; True if a new list arrived."""
        headers = {"If-None-Match": self._etag} if self._etag else {}
        self._conn.request("GET", self._path, headers=headers)
        resp = self._conn.getresponse()
        data = resp.read()
        self.requests += 1
        if resp.status == 304:
            return False
        if resp.status != 200:
            raise BenchError(f"GET {self._path} answered {resp.status}: {data[:200]!r}")
        self._etag = resp.getheader("ETag") or ""
        self.body = data
        return True

    def wait(self, until: Callable[[bytes], bool], timeout: float, interval: float) -> float:
        """Poll until `until(list)` holds; returns time.perf_counter() when it did."""
        deadline = time.perf_counter() + timeout
        checked = False
        while True:
            if self.poll() or not checked:
                checked = True
                if until(self.body):
                    return time.perf_counter()
            if time.perf_counter() > deadline:
                raise BenchError(f"GET {self._path}: condition not met in {timeout} s")
            if interval:
                time.sleep(interval)

    def settle(self, quiet: float = 0.03, timeout: float = 30.0) -> None:
        """Poll until the list stays unchanged for `quiet` seconds."""
        deadline = time.perf_counter() + timeout
        self.poll()
        last_change = time.perf_counter()
        while time.perf_counter() - last_change < quiet:
            time.sleep(quiet / 3)
            if self.poll():
                last_change = time.perf_counter()
            if time.perf_counter() > deadline:
                raise BenchError(f"GET {self._path} kept changing for {timeout} s")


def listed(name: str) -> Callable[[bytes], bool]:
    """A predicate: the /files/ body lists `name` (as its JSON string)."""
    needle = json.dumps(name).encode()
    return lambda body: needle in body


def not_listed(name: str) -> Callable[[bytes], bool]:
    """A predicate: the /files/ body does not list `name`."""
    needle = json.dumps(name).encode()
    return lambda body: needle not in body


# ---------------------------------------------------------------- the run


class Context:
    """One run: its sizes, where files and logs go, profiling, shared folders."""

    def __init__(
        self,
        *,
        quick: bool,
        workdir: Path,
        poll_interval: float,
        profile_dir: Path | None = None,
    ) -> None:
        self.quick = quick
        self.sizes = QUICK if quick else FULL
        self.workdir = workdir
        self.poll_interval = poll_interval
        self.profile_dir = profile_dir
        self.profiles: list[dict[str, Any]] = []
        self._folders: dict[int, Path] = {}
        self._serial = 0

    def scratch(self, name: str) -> Path:
        """A fresh directory under the work directory."""
        self._serial += 1
        path = self.workdir / f"{self._serial:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def procs(self, name: str) -> Procs:
        """A process group with its logs in a fresh directory."""
        return Procs(self.scratch(f"logs-{name}"))

    def folder_with(self, count: int) -> Path:
        """A folder of `count` files, made once per run; users must leave it as they found it."""
        if count not in self._folders:
            say(f"creating a folder of {count:,} files")
            self._folders[count] = make_folder(self.scratch(f"folder-{human(count)}"), count)
        return self._folders[count]

    @contextlib.contextmanager
    def profiled(self, pid: int, label: str, when: bool = True) -> Iterator[None]:
        """Record `pid` with py-spy while the body runs, if this is a profiling run and `when`."""
        if self.profile_dir is None or not when:
            yield
            return
        from bench.profiling import PySpy  # noqa: PLC0415 (only profiling runs need it)

        spy = PySpy(pid, self.profile_dir / (re.sub(r"[^\w.-]+", "-", label) + ".txt"))
        try:
            spy.start()
        except BenchError as err:
            self.profiles.append({"label": label, "error": str(err)})
            yield
            return
        try:
            yield
        finally:
            self.profiles.append({"label": label, **spy.stop()})
