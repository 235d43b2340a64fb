"""The aggregator runs on mimalloc, in its own process, unless told otherwise.

Why mimalloc: see `aggregator/allocator.py`; what it buys is measured by the
load test (`make soak`): memory comes back once the watchers leave.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.allocator import mimalloc_environment, mimalloc_library
from tests.faults.conftest import AggregatorFactory

needs_mimalloc = pytest.mark.skipif(
    mimalloc_library() is None, reason="cmeel-mimalloc is not installed on this platform"
)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@needs_mimalloc
def test_python_m_aggregator_moves_onto_mimalloc_and_keeps_its_pid(
    start_aggregator: AggregatorFactory,
) -> None:
    agg = start_aggregator()
    # The process we spawned (this PID) logged its start, and it is the re-executed one.
    [started] = agg.proc.events("aggregator_started")
    assert started["allocator"] == "mimalloc"
    assert str(mimalloc_library()) in _libraries(agg.proc.pid)
    env = _environ(agg.proc.pid)
    assert env["PYTHONMALLOC"] == "malloc"
    assert env["MIMALLOC_PURGE_DELAY"] == "0"
    assert not agg.proc.events("allocator_pymalloc")
    assert agg.healthz()["status"] == "ok"


def test_allocator_pymalloc_runs_as_it_is(start_aggregator: AggregatorFactory) -> None:
    agg = start_aggregator("--allocator", "pymalloc")
    [started] = agg.proc.events("aggregator_started")
    assert started["allocator"] == "pymalloc"
    assert "libmimalloc" not in _libraries(agg.proc.pid)
    assert "PYTHONMALLOC" not in _environ(agg.proc.pid)
    assert agg.healthz()["status"] == "ok"


def test_the_environment_keeps_other_preloads_and_the_operators_options() -> None:
    env = mimalloc_environment(
        "/lib/libmimalloc.so",
        {"LD_PRELOAD": "/lib/other.so", "MIMALLOC_PURGE_DELAY": "10", "PYTHONMALLOC": "pymalloc"},
    )
    assert env["LD_PRELOAD"] == "/lib/libmimalloc.so /lib/other.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "10"  # set by the operator: theirs wins
    assert env["MIMALLOC_ALLOW_THP"] == "0"
    assert env["PYTHONMALLOC"] == "malloc"  # required: Python objects from mimalloc too
