"""Output of a run: text tables on stdout, bench/results/latest.json, bench/results/lag.png."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import ScenarioResult, Table
from bench.profiling import explain

PROFILE_LINES = 12


def fmt(value: Any) -> str:
    """A figure for a table: thousands separators, 3-4 significant digits, n/a for NaN."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value.is_integer() and abs(value) >= 1000:
            return f"{value:,.0f}"
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 100:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def render_table(table: Table, indent: str = "  ") -> str:
    """Columns right-aligned (the first left-aligned), one row per line."""
    cells = [table.columns] + [[fmt(v) for v in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
    # Numbers right-aligned (and their headers); words and the first column left-aligned.
    numeric = [
        i > 0 and all(isinstance(row[i], int | float) or row[i] == "" for row in table.rows)
        for i in range(len(table.columns))
    ]
    lines = []
    if table.caption:
        lines.append(indent + table.caption + ":")
    for n, row in enumerate(cells):
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append(indent + "  ".join(parts).rstrip())
        if n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header(meta: dict[str, Any]) -> str:
    """The run's header line: when, where, what."""
    mode = "QUICK (tiny sizes; targets not judged)" if meta["quick"] else "full sizes"
    return (
        f"filewatch benchmark, {meta['started']} ({mode})\n"
        f"{meta['cpu_count']} CPUs ({meta['cpu_model']}), Python {meta['python']}, "
        f"{meta['platform']}, commit {meta['commit']}"
    )


def render_scenario(res: ScenarioResult) -> str:
    """One scenario: title, target, its tables, checks, verdict, notes."""
    load = ""
    if res.machine:
        load = (
            f"; other processes {res.machine['other_cpu_percent']:.0f} % of a core, "
            f"steal {res.machine['steal_percent']:.0f} %"
        )
    lines = [
        f"== {res.name}: {res.title}  [{res.seconds:.1f} s{load}]",
        f"  target: {res.target}",
    ]
    if res.error:
        lines.append(f"  ERROR: {res.error}")
    for table in res.tables:
        lines.append(render_table(table))
    for check in res.checks:
        lines.append(f"  * {check.line()}")
    lines.append(f"  verdict: {res.verdict}")
    lines += [f"  note: {note}" for note in res.notes]
    return "\n".join(lines)


def render_profiles(res: ScenarioResult) -> str:
    """The top of each py-spy profile taken for a missed scenario."""
    lines = [
        f"== profile of {res.name} (taken during a second run of the scenario, whose figures "
        "are discarded; labels are scenario:process:phase)"
    ]
    for prof in res.profiles:
        if "error" in prof:
            lines.append(f"  {prof['label']}: no profile: {prof['error']}")
            continue
        if prof.get("kind") == "tracemalloc":
            lines += _render_allocations(prof)
            continue
        lines.append(
            f"  {prof['label']}: py-spy --nonblocking --function (idle excluded), "
            f"{prof['samples']} samples over {prof['seconds']} s, raw stacks in {prof['file']}"
        )
        for kind, title in (
            ("self", "top by self time (any code)"),
            ("inclusive_project", "top of our code by inclusive time"),
        ):
            lines.append(f"    {title}:")
            for frame, count, pct in prof[kind][:PROFILE_LINES]:
                lines.append(f"      {pct:5.1f}%  {count:6d}  {frame}{explain(frame)}")
    return "\n".join(lines)


def _render_allocations(prof: dict[str, Any]) -> list[str]:
    lines = [
        f"  {prof['label']}: Python allocations still held, by source line "
        "(tracemalloc, in-process, the aggregator's own code)"
    ]
    for part, title in (("index", "index + store after the snapshot"), ("bodies", "cached bodies")):
        lines.append(f"    {title}: {prof[part + '_bytes_per_file']:.0f} bytes per file")
        for site, size, per_file, pct in prof[part + "_top"][:PROFILE_LINES]:
            lines.append(f"      {pct:5.1f}%  {per_file:7.1f} B/file  {size:>12,} B  {site}")
    return lines


def summary(results: Sequence[ScenarioResult]) -> str:
    """One line per scenario: its verdict and its checks."""
    table = Table(["scenario", "verdict", "seconds", "other load, % of a core"])
    for res in results:
        other = res.machine.get("other_cpu_percent", math.nan)
        table.rows.append([res.name, res.verdict, res.seconds, other])
    lines = ["== summary", render_table(table)]
    for res in results:
        for check in res.checks:
            if check.status == "MISSED":
                lines.append(f"  MISSED {res.name}: {check.line()}")
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, meta: dict[str, Any], results: Sequence[ScenarioResult]) -> None:
    """Every figure of the run, one object per scenario."""
    doc = {
        "meta": meta,
        "scenarios": {
            res.name: {
                "title": res.title,
                "target": res.target,
                "verdict": res.verdict,
                "seconds": res.seconds,
                "error": res.error,
                "figures": res.figures,
                "checks": [c.as_json() for c in res.checks],
                "tables": [
                    {"caption": t.caption, "columns": t.columns, "rows": t.rows} for t in res.tables
                ],
                "notes": res.notes,
                "profiles": res.profiles,
                "machine_load": res.machine,
            }
            for res in results
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")


def write_png(path: Path, meta: dict[str, Any], results: Sequence[ScenarioResult]) -> str:
    """CDFs of every lag sample, one panel per family; returns what was done (for the log)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no PNG drawn"
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    ticker = importlib.import_module("matplotlib.ticker")
    panels: list[tuple[str, dict[str, list[float]]]] = []
    groups = (
        (
            "one change at a time: created -> in, deleted -> gone from GET /files/",
            ("lag_floor", "lag_grpc", "lag_legacy"),
        ),
        ("churn: change on disk -> WatchFiles event", ("churn",)),
        ("moves and renames -> GET /files/", ("move",)),
    )
    by_name = {r.name: r for r in results}
    for title, names in groups:
        series = {
            label: values
            for name in names
            if name in by_name
            for label, values in by_name[name].samples.items()
            if values
        }
        if series:
            panels.append((title, series))
    if not panels:
        return "no lag samples in this run: no PNG drawn"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for label, values in series.items():
            ordered = sorted(values)
            n = len(ordered)
            xs = [ordered[0], *ordered]
            ys = [0.0, *((i + 1) / n for i in range(n))]
            ax.step(xs, ys, where="post", label=f"{label} (n={n})")
        ax.set_ylim(0, 1.02)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("lag, ms (log scale)")
        ax.set_ylabel("fraction of changes")
        ax.set_title(title, fontsize=10)
        ax.axhline(0.5, color="grey", linewidth=0.5, linestyle=":")
        ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"filewatch lag CDFs, {meta['started']}, {meta['cpu_count']} CPUs, "
        f"Python {meta['python']}{' (QUICK)' if meta['quick'] else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"lag distributions drawn in {path}"
