"""filewatch benchmarks: every scenario, real processes, figures from one run.

    python bench/run.py                  # every scenario, full sizes (several minutes)
    python bench/run.py --quick          # tiny sizes, a smoke run (under a minute)
    python bench/run.py --only read,memory --out /tmp/results

Prints a table per scenario (header: CPU count, Python version), writes every
figure to OUT/latest.json and the lag distributions to OUT/lag.png (when
matplotlib is installed: the `bench` extra). Each target of the issue is
judged met or MISSED; a missed scenario is run a second time with py-spy
attached to the aggregator and the top of that profile is reported too (the
reported figures never come from the profiled run). Exit code 1 if a
scenario could not run; a missed target is reported, not a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, our folder would come first on sys.path; the repository must.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402

from bench import (  # noqa: E402
    report,
    scenarios_ingest,
    scenarios_lag,
    scenarios_read,
    scenarios_replicas,
    scenarios_scale,
    scenarios_subscribers,
)
from bench.harness import (  # noqa: E402
    Context,
    MachineLoad,
    ScenarioResult,
    close_async,
    say,
    wait_quiet,
)
from bench.profiling import pyspy_path  # noqa: E402

Family = Callable[[Context, frozenset[str]], list[ScenarioResult]]
DISTURBED = 10.0
"""% of a core used by other processes above which a scenario's figures are flagged."""

FAMILIES: list[tuple[tuple[str, ...], Family]] = [
    (("lag_floor", "lag_grpc", "lag_legacy"), scenarios_lag.run_lag),
    (("move",), scenarios_lag.run_move),
    (("churn",), scenarios_lag.run_churn),
    (("ingest",), scenarios_ingest.run_ingest),
    (("small_batches",), scenarios_ingest.run_small_batches),
    (("read", "read_after_change"), scenarios_read.run_read),
    (("memory",), scenarios_scale.run_memory),
    (("startup",), scenarios_scale.run_startup),
    (("many_watchers",), scenarios_scale.run_many),
    (("replicas",), scenarios_replicas.run_replicas),
    (("subscribers",), scenarios_subscribers.run_subscribers),
]
SCENARIOS: tuple[str, ...] = tuple(name for names, _ in FAMILIES for name in names)


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.rstrip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not dirty:
        return head
    areas = sorted({line[3:].split("/", 1)[0] for line in dirty.splitlines()})
    return f"{head} (uncommitted changes in {', '.join(areas)})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meta(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": ns.quick,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _git_commit(),
        "load_average_at_start": list(os.getloadavg()),
        "poll_interval_ms": ns.poll_interval_ms,
        "argv": sys.argv[1:],
    }


def _run_family(
    ctx: Context,
    names: tuple[str, ...],
    family: Family,
    selected: frozenset[str],
    quiet: tuple[float, float] = (DISTURBED, 0.0),
) -> list[ScenarioResult]:
    """Run one family; a failure becomes an error result for each of its scenarios.

    First waits (at most quiet[1] s) for other processes to use under quiet[0] %
    of a core, then measures how much they used while the family ran.
    """
    wanted = frozenset(n for n in names if n in selected)
    before = wait_quiet(*quiet) if quiet[1] > 0 else {}
    load = MachineLoad()
    load.start()
    t0 = time.monotonic()
    try:
        results = family(ctx, wanted)
    except Exception as err:  # a scenario that cannot run is reported, the others go on
        detail = "".join(traceback.format_exception_only(err)).strip()
        say(f"{','.join(sorted(wanted))} failed:\n{traceback.format_exc()}")
        results = [ScenarioResult(n, n, "", error=detail) for n in names if n in wanted]
    seconds = time.monotonic() - t0
    machine = load.stop()
    if before:
        machine["waited_for_quiet_seconds"] = before["waited_seconds"]
    for res in results:
        res.seconds = seconds
        res.machine = machine
        if machine["other_cpu_percent"] > quiet[0]:
            res.notes.append(
                f"DISTURBED: other processes used {machine['other_cpu_percent']:.0f} % of a core "
                "while this scenario ran; its figures are not those of a quiet machine"
            )
    return results


def _profile_misses(
    ns: argparse.Namespace, workdir: Path, out: Path, results: list[ScenarioResult]
) -> None:
    """Run each missed scenario again with py-spy on the aggregator; attach the profiles."""
    missed = {r.name: r for r in results if r.verdict == "MISSED" or (ns.profile and not r.error)}
    if not missed or ns.no_profile:
        return
    if pyspy_path() is None:
        for res in missed.values():
            res.profiles.append({"label": res.name, "error": "py-spy is not installed"})
        return
    for names, family in FAMILIES:
        wanted = frozenset(n for n in names if n in missed)
        if not wanted:
            continue
        say(f"profiling {','.join(sorted(wanted))} (a second run, with py-spy)")
        ctx = Context(
            quick=ns.quick,
            workdir=workdir / f"profile-{'-'.join(sorted(wanted))}",
            poll_interval=ns.poll_interval_ms / 1000,
            profile_dir=out / "profiles",
        )
        ctx.workdir.mkdir(parents=True)
        _run_family(ctx, names, family, wanted)
        for name in wanted:
            missed[name].profiles += [
                p for p in ctx.profiles if str(p["label"]).startswith(name + ":")
            ]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    """Run the selected scenarios; print, write JSON and PNG; exit 1 if one could not run."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, < 60 s")
    parser.add_argument(
        "--only", default="", help=f"comma-separated scenarios, of: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "results", help="where latest.json and lag.png go"
    )
    parser.add_argument(
        "--workdir", type=Path, help="scratch folders and logs (default: a temp dir)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch dir (logs) at the end"
    )
    parser.add_argument(
        "--poll-interval-ms", type=float, default=0.5, help="GET /files/ poll interval for lags"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="do not re-run missed scenarios under py-spy"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile every scenario run, not only missed ones"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help=f"seconds to wait before each scenario for other processes to use under "
        f"{DISTURBED:g} %% of a core (default: 120, 0 with --quick)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ns = parser.parse_args()
    # SIGTERM, and SIGINT even where a shell started us ignoring it: stop our children first.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    if ns.list:
        print("\n".join(SCENARIOS))
        return 0
    selected = frozenset(s.strip() for s in ns.only.split(",") if s.strip()) or frozenset(SCENARIOS)
    unknown = selected - set(SCENARIOS)
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(sorted(unknown))}; know {', '.join(SCENARIOS)}"
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 16_384:  # many_watchers holds a socket per stream on both ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16_384), hard))
    workdir = ns.workdir or Path(tempfile.mkdtemp(prefix="filewatch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    meta = _meta(ns)
    print(report.header(meta), flush=True)
    ctx = Context(quick=ns.quick, workdir=workdir, poll_interval=ns.poll_interval_ms / 1000)
    results: list[ScenarioResult] = []
    t0 = time.monotonic()
    try:
        for names, family in FAMILIES:
            if not selected.intersection(names):
                continue
            quiet = (
                DISTURBED,
                ns.quiet_wait if ns.quiet_wait is not None else (0 if ns.quick else 120),
            )
            for res in _run_family(ctx, names, family, selected, quiet):
                for check in res.checks:
                    check.judge(ns.quick)
                results.append(res)
                print("\n" + report.render_scenario(res), flush=True)
        meta["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
        meta["seconds"] = round(time.monotonic() - t0, 1)
        _profile_misses(ns, workdir, ns.out, results)
        for res in results:
            if res.profiles:
                print("\n" + report.render_profiles(res), flush=True)
        print("\n" + report.summary(results), flush=True)
        print(f"  total {meta['seconds']} s", flush=True)
        report.write_json(ns.out / "latest.json", meta, results)
        print(f"  figures written to {ns.out / 'latest.json'}")
        print(f"  {report.write_png(ns.out / 'lag.png', meta, results)}", flush=True)
    finally:
        close_async()
        failed = any(r.error for r in results)
        if ns.keep or failed:
            print(f"  scratch files and process logs kept in {workdir}", flush=True)
        elif ns.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        print(f"bench interrupted ({stop}); every process it started is stopped", file=sys.stderr)
        sys.exit(130)
