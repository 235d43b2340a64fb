"""replicas: one watcher feeding two aggregators (`-aggregator grpc://a,grpc://b`).

The same one-change-at-a-time trials as lag_grpc (file created -> visible in
GET /files/, deleted -> gone), in three phases against the same two
aggregators:

1. one: the watcher reports to replica a alone (the baseline);
2. two: it reports to a and b; lag measured at a, then at b;
3. b frozen: b is SIGSTOPped (to the watcher, a link that carries nothing and
   answers nothing, like a cut cable) and the lag is measured at a.

Each phase's p50 is reported as a ratio to phase 1's; the watcher's CPU per
change is reported for one target and for two.
"""

from __future__ import annotations

import signal
from pathlib import Path

from bench.harness import (
    AggregatorProc,
    Check,
    Context,
    FilesPoller,
    ScenarioResult,
    Table,
    cpu_seconds,
    histogram,
    ratio,
    say,
    start_aggregator,
    start_watcher,
    summarize,
    wait_file_count,
)
from bench.scenarios_lag import (
    LAG_COLUMNS,
    SYNC_LAG,
    WARMUP,
    _LagRun,
    _row,
    _trials,
    _wait_watchers,
)

RATIO_TARGET = 1.2


def _phase(
    ctx: Context,
    folder: Path,
    at: AggregatorProc,
    watcher_pid: int,
    prefix: str,
) -> tuple[_LagRun, float]:
    """The trials in `folder` read at `at`, and the watcher's CPU per change (ms) over them."""
    poller = FilesPoller(at.http_port)
    try:
        poller.settle()
        cpu0 = cpu_seconds(watcher_pid)
        run = _trials(
            ctx, poller, folder, prefix, lambda: histogram(at.http_port, SYNC_LAG, protocol="grpc")
        )
        cpu = cpu_seconds(watcher_pid) - cpu0
    finally:
        poller.close()
    changes = 2 * (WARMUP + ctx.sizes.lag_trials)  # each file created, then deleted
    return run, cpu / changes * 1000


def run_replicas(ctx: Context, selected: frozenset[str]) -> list[ScenarioResult]:
    """One watcher, one replica, then two, then two with one frozen."""
    del selected
    procs = ctx.procs("replicas")
    runs: dict[str, _LagRun] = {}
    cpu: dict[str, float] = {}
    try:
        a = start_aggregator(procs, "replica-a")
        b = start_aggregator(procs, "replica-b")
        folder = ctx.scratch("replicas")
        trials = ctx.sizes.lag_trials

        say(f"replicas: one target, {trials} trials (create, then delete)")
        watcher = start_watcher(procs, "watcher-one", folder, a.grpc_url)
        _wait_watchers(a, 0, 1, 60, procs)
        runs["one"], cpu["one"] = _phase(ctx, folder, a, watcher.pid, "one")
        procs.stop(watcher.proc)
        wait_file_count(a.http_port, 0, 60)

        say(f"replicas: two targets, {trials} trials read at a, then {trials} at b")
        watcher = start_watcher(procs, "watcher-two", folder, f"{a.grpc_url},{b.grpc_url}")
        _wait_watchers(a, 0, 1, 60, procs)
        _wait_watchers(b, 0, 1, 60, procs)
        runs["two, at a"], cpu["two, at a"] = _phase(ctx, folder, a, watcher.pid, "two-a")
        runs["two, at b"], cpu["two, at b"] = _phase(ctx, folder, b, watcher.pid, "two-b")

        say(f"replicas: b frozen (SIGSTOP), {trials} trials read at a")
        b.proc.popen.send_signal(signal.SIGSTOP)
        try:
            runs["b frozen, at a"], cpu["b frozen, at a"] = _phase(
                ctx, folder, a, watcher.pid, "frozen"
            )
        finally:
            b.proc.popen.send_signal(signal.SIGCONT)
        procs.stop(watcher.proc)
    finally:
        procs.stop_all()

    res = ScenarioResult(
        "replicas",
        "one watcher feeding two aggregators: file created -> visible in GET /files/ of each, "
        "against one aggregator alone, and with the other replica frozen",
        f"p50 at each replica, and at a with b frozen, <= {RATIO_TARGET} x the p50 with one "
        "replica; watcher CPU per change with two targets reported",
    )
    base = summarize(runs["one"].lags)["p50"]
    table = Table(["phase", *LAG_COLUMNS, "p50 / one", "watcher CPU ms/change"])
    for phase, run in runs.items():
        p50 = summarize(run.lags)["p50"]
        r = ratio(p50, base)
        table.rows.append([phase, *_row(run.lags), r, round(cpu[phase], 4)])
        res.figures[phase.replace(", ", "_").replace(" ", "_")] = {
            **summarize(run.lags),
            "ratio_to_one": r,
            "delete": summarize(run.deletes),
            "watcher_cpu_ms_per_change": cpu[phase],
        }
        res.samples[phase] = run.lags
        if phase != "one":
            res.checks.append(Check(f"create p50 {phase} / one replica", r, RATIO_TARGET, "x"))
    table.caption = "create -> visible, ms (delete -> gone is in the JSON figures)"
    res.tables.append(table)
    res.figures["watcher_cpu_ms_per_change"] = {
        "one_target": cpu["one"],
        "two_targets": (cpu["two, at a"] + cpu["two, at b"]) / 2,
    }
    res.notes += [
        "the same trials as lag_grpc (empty folder, one change at a time, GET /files/ polled "
        "with If-None-Match); the watcher's CPU is read from /proc over each phase's changes",
        "b frozen: SIGSTOP, so its TCP connection stays open and carries nothing; the watcher "
        "notices by gRPC keepalive and retries b in the background",
    ]
    return [res]
