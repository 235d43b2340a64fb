"""The legacy protocol from the watcher's side: hello, PATCH /files, bye.

Byte for byte what the Go watcher sends, minus its faults: the first hello goes
out at once, bye is said on SIGINT too, and a failed request is retried with
backoff instead of being lost, and names that are not UTF-8 are kept apart
(undecodable bytes as \\udcXY escapes, not U+FFFD: see `watcher.legacy_json`).
Each change gets its own seqno (+1 per change), the same counter `GET /files`
reports, so the aggregator's snapshot and our PATCHes line up.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import structlog
from opentelemetry.trace import SpanKind

from common.tracing import inject
from watcher.errors import RejectedError
from watcher.legacy_json import dumps, legacy_name
from watcher.link import LinkStatus, StreamState, backoff
from watcher.state import FolderState, Op
from watcher.telemetry import WatcherMetrics

log = structlog.get_logger(__name__)

_LEGACY_OPS = {Op.ADD: "add", Op.REMOVE: "remove"}


class LegacyClient(LinkStatus):
    """Reports the folder to a legacy aggregator until `stop` is set."""

    def __init__(
        self,
        base_url: str,
        instance: str,
        http_port: int,
        state: FolderState,
        wake: asyncio.Event,
        *,
        token: str = "",
        hello_interval: float = 5.0,
        request_timeout: float = 5.0,
        max_batch: int = 1000,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        metrics: WatcherMetrics | None = None,
    ) -> None:
        self._base = base_url.rstrip("/") + "/"
        self._instance = instance
        self._port = http_port
        self._state = state
        self._wake = wake
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._hello_interval = hello_interval
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._max_batch = max_batch
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        super().__init__(metrics, base_url)

    async def _post(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        body: Any,
        traceparent: str = "",
    ) -> None:
        data = dumps(body)
        headers = {**self._headers, "traceparent": traceparent} if traceparent else self._headers
        async with session.request(
            method, self._base + path, data=data, headers=headers, allow_redirects=False
        ) as resp:
            if resp.status == 200:
                return
            text = (await resp.text())[:300]
            if 400 <= resp.status < 500 and resp.status not in (408, 429):
                raise RejectedError(f"{method} /{path} answered {resp.status}: {text}")
            raise aiohttp.ClientResponseError(
                resp.request_info, resp.history, status=resp.status, message=text
            )

    async def _hello_loop(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        body = {"instance": self._instance, "port": self._port}
        failures = 0
        while not stop.is_set():
            try:
                await self._post(session, "POST", "hello", body)
                self.stream_state = StreamState.LIVE
                failures = 0
                self._accepted("hello_accepted")
            except (aiohttp.ClientError, TimeoutError, RejectedError) as err:
                failures += 1
                self.stream_state = StreamState.BACKOFF
                refused = isinstance(err, RejectedError)
                if refused:
                    self.refusal = str(err)
                # One line per attempt: the failures in a row, and when the next hello goes.
                log.warning(
                    "hello_failed",
                    error=str(err) or type(err).__name__,
                    refused=refused,
                    attempt=failures,
                    retry_in=self._hello_interval,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._hello_interval)

    def _take_ops(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        while len(ops) < self._max_batch:
            batch = self._state.take_batch(1, modify=False)
            if batch is None:
                break
            change = batch.changes[0]
            ops.append(
                {
                    "instance": self._instance,
                    "op": _LEGACY_OPS[change.op],
                    "value": {"filename": legacy_name(change.name)},
                    "seqno": batch.sequence,
                }
            )
        return ops

    async def _send(
        self, session: aiohttp.ClientSession, ops: list[dict[str, Any]], stop: asyncio.Event
    ) -> None:
        """PATCH until it is accepted; on stop, one last try."""
        failures = 0
        while True:
            try:
                await self._patch(session, ops)
                self.count_sent(op["op"] for op in ops)
                return
            except RejectedError as err:
                log.error("patch_rejected", error=str(err), ops=len(ops))
                return
            except (aiohttp.ClientError, TimeoutError) as err:
                failures += 1
                self.reconnects.inc()
                log.warning("patch_failed", error=str(err) or type(err).__name__, attempt=failures)
                if stop.is_set():
                    return
            delay = backoff(failures, self._reconnect_min, self._reconnect_max)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _patch(self, session: aiohttp.ClientSession, ops: list[dict[str, Any]]) -> None:
        tracer = self.metrics.tracer
        if tracer is None:
            await self._post(session, "PATCH", "files", ops)
            return
        attributes: dict[str, str | int] = {
            "filewatch.node": self._instance,
            "filewatch.count": len(ops),
            "filewatch.sequence.first": ops[0]["seqno"],
            "filewatch.sequence.last": ops[-1]["seqno"],
        }
        with tracer.start_as_current_span(
            "watcher.batch", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            await self._post(session, "PATCH", "files", ops, inject(span)[0])

    async def _send_loop(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        wake = self._wake
        # A stop wakes the loop like a change does: it waits on one event, with
        # no task or asyncio.wait per change (as the gRPC client does).
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: wake.set())
        try:
            while True:
                ops = self._take_ops()
                if ops:
                    await self._send(session, ops, stop)
                    continue
                if stop.is_set():
                    return
                wake.clear()  # nothing came since _take_ops: no await in between
                await wake.wait()
        finally:
            stopper.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        """Hello every interval, PATCH each change, and bye when `stop` is set."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._hello_loop(session, stop), name="legacy-hello")
                tg.create_task(self._send_loop(session, stop), name="legacy-patch")
            try:
                await self._post(session, "POST", "bye", {"instance": self._instance})
            except (aiohttp.ClientError, TimeoutError, RejectedError) as err:
                log.warning("bye_failed", error=str(err) or type(err).__name__)
        self.stream_state = StreamState.STOPPED
