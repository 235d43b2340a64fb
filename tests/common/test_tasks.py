"""The Supervisor: every background task has a parent that logs, restarts and waits for it."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from common.tasks import Supervisor
from tests.support import wait_for_async


async def test_a_loop_that_raises_is_logged_and_started_again() -> None:
    runs: list[int] = []

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.Event().wait()  # the third run lives on

    failures: list[str] = []
    tasks = Supervisor(restart_delay=0.01, on_failure=failures.append)
    with capture_logs() as logs:
        tasks.keep("looper", loop)

        async def count() -> int:
            return len(runs)

        await wait_for_async(count, 5, until=lambda n: n == 3, what="two restarts")
        await tasks.close()
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert [e["task"] for e in failed] == ["looper", "looper"]
    assert all(e["exc_info"] for e in failed)  # the traceback is in the log
    assert failures == ["looper", "looper"]
    assert len(tasks) == 0


async def test_restart_delays_double_and_are_capped() -> None:
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def fails() -> None:
        starts.append(loop.time())
        raise ValueError("always")

    tasks = Supervisor(restart_delay=0.02, max_restart_delay=0.08)
    with capture_logs() as logs:
        tasks.keep("failing", fails)

        async def count() -> int:
            return len(starts)

        await wait_for_async(count, 5, until=lambda n: n >= 6, what="six runs")
        await tasks.close()
    delays = [e["delay"] for e in logs if e["event"] == "task_restarting"][:5]
    assert delays == [0.02, 0.04, 0.08, 0.08, 0.08]


async def test_a_loop_that_returns_is_done_and_a_failed_job_is_logged_not_retried() -> None:
    ran: list[str] = []

    async def once() -> None:
        ran.append("loop")

    async def job() -> None:
        ran.append("job")
        raise KeyError("lost")

    tasks = Supervisor(restart_delay=0.01)
    with capture_logs() as logs:
        tasks.keep("once", once)
        tasks.spawn("job", job())

        async def left() -> int:
            return len(tasks)

        await wait_for_async(left, 5, until=lambda n: n == 0, what="both to finish")
    assert sorted(ran) == ["job", "loop"]
    assert [e["task"] for e in logs if e["event"] == "task_failed"] == ["job"]


async def test_close_cancels_and_waits_for_everything_and_then_refuses_new_tasks() -> None:
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    tasks = Supervisor()
    tasks.keep("a", lambda: forever("a"))
    tasks.spawn("b", forever("b"))
    await asyncio.sleep(0)  # let both start
    await tasks.close()
    assert sorted(cancelled) == ["a", "b"]
    assert len(tasks) == 0
    with pytest.raises(RuntimeError, match="closed"):
        tasks.spawn("c", forever("c"))
