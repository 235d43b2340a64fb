"""One owner for a process's background tasks: failures are logged, loops restarted, all awaited.

A bare `create_task` loses its exception until the task is garbage-collected,
and a loop that raised (a TTL reaper, say) stops doing its job in silence. A
`Supervisor` is the parent of every background task of a process:

- `keep(name, run)`: a long-lived loop. If it raises, the failure is logged
  (`task_failed`, with the traceback) and the loop is started again after a
  delay that doubles per failure in a row (capped); a clean return ends it.
- `spawn(name, coro)`: a short job (a fetch). Its failure is logged, never lost.
- `close(wait=...)`: lets the tasks end by themselves for `wait` seconds (a
  stop was signalled to them), then cancels the rest and waits for them, bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Supervisor:
    """The parent of a process's background tasks.

    Args:
        restart_delay: seconds before a failed loop runs again; doubled per
            failure in a row, up to `max_restart_delay`. A loop that ran for
            longer than `max_restart_delay` before failing starts over at
            `restart_delay`.
        on_failure: called with the task's name at each failure (a metric).
        close_timeout: seconds `close` waits for cancelled tasks to end.
    """

    def __init__(
        self,
        *,
        restart_delay: float = 0.1,
        max_restart_delay: float = 10.0,
        on_failure: Callable[[str], None] | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self._restart_delay = restart_delay
        self._max_restart_delay = max_restart_delay
        self._on_failure = on_failure
        self._close_timeout = close_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` for the life of the supervisor, restarting it when it raises."""
        self._start(name, self._keep(name, run))

    def spawn(self, name: str, job: Coroutine[Any, Any, None]) -> None:
        """Run one job; a failure is logged, not retried."""
        if self._closed:
            job.close()  # never awaited, and never to be
        self._start(name, self._guard(name, job))

    async def close(self, *, wait: float = 0.0) -> None:
        """Give the tasks `wait` seconds to end, then cancel the rest and wait for them.

        The wait for cancelled tasks is bounded by `close_timeout`. Idempotent.
        """
        self._closed = True
        if wait > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._close_timeout)
            for task in pending:
                log.error("task_not_stopped", task=task.get_name(), timeout=self._close_timeout)

    def _start(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()
            raise RuntimeError(f"supervisor closed: cannot start {name!r}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _failed(self, name: str) -> None:
        log.exception("task_failed", task=name)
        if self._on_failure is not None:
            self._on_failure(name)

    async def _guard(self, name: str, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except Exception:
            self._failed(name)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay = self._restart_delay
        while True:
            began = time.monotonic()
            try:
                await run()
            except Exception:
                self._failed(name)
            else:
                return
            if time.monotonic() - began > self._max_restart_delay:
                delay = self._restart_delay  # it had been healthy: not a failure in a row
            log.info("task_restarting", task=name, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_restart_delay)
