"""The aggregator runs on mimalloc, in its own process, unless told otherwise.

Why mimalloc: see `aggregator/allocator.py`. What it buys, memory that comes
back once the watchers leave, is checked here for one big watcher and by the
load test (`make soak` for the full one).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from aggregator.allocator import mimalloc_environment, mimalloc_library
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc
from tests.faults.conftest import Aggregator, AggregatorFactory, measured, settled_rss
from tests.support import wait_for_async

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
    assert env["MIMALLOC_ALLOW_THP"] == "0"
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


async def _snapshot_then_goodbye(agg: Aggregator, files: int) -> tuple[int, int]:
    """One watcher sends `files` files, then leaves; RSS (KiB) with them listed, and after."""
    async with grpc.aio.insecure_channel(agg.grpc_target) as channel:
        call = pb_grpc.WatcherSyncStub(channel).Sync()
        await call.write(pb.WatcherMessage(hello=pb.Hello(node="big", epoch="e1")))
        assert (await call.read()).WhichOneof("kind") == "welcome"
        for start in range(0, files, 5000):
            chunk = [
                pb.FileInfo(name=b"file-%09d-with-a-longish-name.dat" % i, size=i, mtime_ns=i)
                for i in range(start, min(files, start + 5000))
            ]
            await call.write(pb.WatcherMessage(snapshot_chunk=pb.SnapshotChunk(files=chunk)))
        await call.write(pb.WatcherMessage(snapshot_end=pb.SnapshotEnd(sequence=0, count=files)))
        await wait_for_async(
            lambda: asyncio.to_thread(agg.healthz), 60, until=lambda h: h["files"] == files
        )
        await asyncio.to_thread(agg.request, "GET", "/files/")  # its body cached too
        loaded = agg.proc.rss_kib()
        trims = len(agg.proc.events("memory_trimmed"))
        await call.write(pb.WatcherMessage(goodbye=pb.Goodbye()))
        await call.done_writing()
        while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
            pass  # acks: the call ends once they are read
        assert await call.code() == grpc.StatusCode.OK
    await asyncio.to_thread(agg.request, "GET", "/files/")  # drops the big cached body
    await wait_for_async(
        lambda: asyncio.to_thread(agg.proc.events, "memory_trimmed"),
        30,
        until=lambda found: any(t["files_change"] < 0 for t in found[trims:]),
        what="the trim after the watcher left",
    )
    return loaded, await settled_rss(agg.proc)


@needs_mimalloc
async def test_a_big_watchers_memory_goes_back_when_it_leaves(
    start_aggregator: AggregatorFactory,
) -> None:
    files = 200_000
    agg = start_aggregator("--trim-after-files", str(files // 2))
    await asyncio.to_thread(agg.request, "GET", "/files/")
    before = await settled_rss(agg.proc)
    loaded, after = await _snapshot_then_goodbye(agg, files)
    measured("200k-file watcher: aggregator RSS before it came", before / 1024, "MiB")
    measured("200k-file watcher: aggregator RSS with its files listed", loaded / 1024, "MiB")
    measured("200k-file watcher: aggregator RSS once it left", after / 1024, "MiB")
    assert loaded - before > 20 * 1024, "the load did not take memory: the test tells nothing"
    assert after - before <= (loaded - before) // 4, (
        f"RSS {before / 1024:.0f} MiB before, {loaded / 1024:.0f} with 200k files, "
        f"{after / 1024:.0f} after they left: the memory did not come back"
    )
