"""The aggregator's background tasks have an owner: a failure is logged, the task goes on.

A real `Aggregator` on 127.0.0.1 port 0, in this event loop. Its TTL reaper is
made to fail for real: the Prometheus counter it increments after an eviction
raises once (a broken dependency, as a full disk or a bug in a library would
be). The next watcher's files must still go at their TTL, and `stop()` must
still stop everything.
"""

from __future__ import annotations

import time
from dataclasses import replace

import aiohttp
from prometheus_client import Counter
from structlog.testing import capture_logs

from aggregator.app import Aggregator
from aggregator.config import AggregatorConfig
from aggregator.index import pack_meta
from aggregator.telemetry import Metrics
from tests.support import wait_for_async

HOST = "127.0.0.1"
CONFIG = AggregatorConfig(http=(f"{HOST}:0",), grpc=f"{HOST}:0", ttl=0.3, grace=1.0)


class FailsOnce(Counter):
    """A counter whose first `inc` raises."""

    failed = False

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the counter broke")
        super().inc(amount, exemplar)


def vanished(aggregator: Aggregator, node: str) -> None:
    """A watcher with one file whose stream just broke: its TTL runs from now."""
    index = aggregator.store.index
    index.begin_snapshot(node, "epoch")
    index.extend_snapshot(node, [(b"f.txt", pack_meta(1, 1))])
    aggregator.store.commit_snapshot(node, 0, "test")
    aggregator.liveness.seen(node, "grpc", time.monotonic())


async def test_a_failing_reaper_is_logged_and_restarted_and_stop_still_stops() -> None:
    metrics = Metrics()
    metrics.watchers_expired = FailsOnce("expired_test", "test", registry=None)
    aggregator = Aggregator(replace(CONFIG), metrics=metrics)
    await aggregator.start()
    stopped = False
    try:
        with capture_logs() as logs:
            vanished(aggregator, "first")

            async def failures() -> list[str]:
                return [e["task"] for e in logs if e["event"] == "task_failed"]

            await wait_for_async(failures, 5, until=lambda t: t == ["ttl-reaper"])
            # The reaper runs again: a watcher that vanishes now still goes at its TTL.
            vanished(aggregator, "second")

            async def held() -> int:
                return aggregator.store.index.watcher_count

            await wait_for_async(held, 5, until=lambda n: n == 0, what="both evicted")
            await aggregator.stop()
            stopped = True
        assert any(e["event"] == "watcher_expired" and e["node"] == "second" for e in logs)
        assert not any(e["event"] == "stop_step_failed" for e in logs)
        # Everything was stopped: the HTTP port no longer answers.
        port = aggregator.http_ports[0]
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"http://{HOST}:{port}/healthz") as resp:
                    answered = resp.status
            except aiohttp.ClientConnectionError:
                answered = 0
        assert answered == 0
    finally:
        if not stopped:
            await aggregator.stop()
