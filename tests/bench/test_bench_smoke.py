"""`python bench/run.py --quick` runs every scenario at tiny sizes and writes every figure.

Not a timed test: nothing here compares a figure with a target (quick sizes
are never judged). It keeps the harness from rotting: each scenario must run
against the real processes and produce numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
# Every scenario of the issue; the harness may add more, never drop one.
EXPECTED = {
    "lag_floor",
    "lag_grpc",
    "lag_legacy",
    "churn",
    "ingest",
    "read",
    "read_after_change",
    "move",
    "memory",
    "startup",
    "many_watchers",
    "replicas",
    "small_batches",
    "subscribers",
}
QUICK_BUDGET = 110.0
"""The quick run must take under a minute; this bound only stops a hung run."""


def _numbers(value: Any) -> list[float]:
    """Every finite number inside a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _registered() -> set[str]:
    listing = subprocess.run(
        [sys.executable, str(RUN), "--list"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    )  # fmt: skip
    return set(listing.stdout.split())


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out), "--workdir", str(work)],
        check=False, capture_output=True, text=True, timeout=QUICK_BUDGET, cwd=ROOT,
    )  # fmt: skip
    return proc, out


@pytest.mark.timeout(QUICK_BUDGET + 60)
def test_quick_run_exits_zero_and_prints_tables(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = quick_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    assert "CPUs" in proc.stdout and "Python" in proc.stdout
    for name in EXPECTED:
        assert f"== {name}:" in proc.stdout, f"no table for {name}:\n{proc.stdout}"


@pytest.mark.timeout(QUICK_BUDGET + 60)
def test_quick_run_writes_every_scenario_with_numeric_figures(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc = json.loads((out / "latest.json").read_text())
    meta = doc["meta"]
    assert meta["quick"] is True
    assert isinstance(meta["cpu_count"], int) and meta["python"]
    registered = _registered()
    assert registered >= EXPECTED
    assert set(doc["scenarios"]) == registered
    for name, scenario in doc["scenarios"].items():
        assert scenario["error"] is None, f"{name}: {scenario['error']}"
        assert scenario["verdict"] != "error", name
        assert _numbers(scenario["figures"]), f"{name} has no numeric figure"
        for check in scenario["checks"]:
            assert isinstance(check["value"], int | float), f"{name}: {check}"
            assert check["status"] == "not judged (quick sizes)", f"{name}: {check}"


@pytest.mark.timeout(QUICK_BUDGET + 60)
def test_quick_run_draws_the_lag_png_when_matplotlib_is_installed(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    png = out / "lag.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists()
        assert "no PNG" in proc.stdout
    else:
        assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(QUICK_BUDGET + 60)
def test_quick_run_compares_the_lag_scenarios_with_the_floor(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    scenarios = json.loads((out / "latest.json").read_text())["scenarios"]
    floor = scenarios["lag_floor"]["figures"]
    for key in ("files_0", "delete_files_0"):
        assert floor[key]["n"] > 0 and floor[key]["p50"] > 0, (key, floor)
    for name in ("lag_grpc", "lag_legacy"):
        figures = scenarios[name]["figures"]
        assert figures["files_0"]["n"] > 0 and figures["delete_files_0"]["n"] > 0, name
        ratios = figures["ratio_to_floor_files_0"]
        for key in ("create_p50", "delete_p50", "create_p99", "delete_p99"):
            assert isinstance(ratios[key], float) and ratios[key] > 0, (name, key, ratios)


def test_the_floor_applies_inotify_events_to_its_sorted_list(tmp_path: Path) -> None:
    from bench.lag_floor import Inotify, Listing  # noqa: PLC0415 (a script's module)

    (tmp_path / "b").touch()
    inotify = Inotify(str(tmp_path))
    try:
        listing = Listing(str(tmp_path))
        assert listing.names == ["b"]
        body0, etag0 = listing.body()
        assert json.loads(body0) == {"files": [{"filename": "b"}]}
        (tmp_path / "c").touch()
        (tmp_path / "a").touch()
        (tmp_path / "b").rename(tmp_path / "d")
        (tmp_path / "sub").mkdir()
        (tmp_path / "c").unlink()
        listing.apply(inotify.read())
        assert listing.names == ["a", "d"]
        body1, etag1 = listing.body()
        assert body1 == b'{"files":[{"filename":"a"},{"filename":"d"}]}'
        assert etag1 != etag0
        assert inotify.read() == []
    finally:
        inotify.close()
