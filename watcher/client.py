"""The watcher's gRPC `Sync` stream: hello, snapshot or resume, batches, heartbeats.

Reconnects with capped, jittered exponential backoff. After a reconnect it
resumes from the aggregator's applied sequence when the aggregator still holds
this epoch and the resend ring reaches back; otherwise it sends a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
import structlog
from opentelemetry.trace import SpanKind

from common.tracing import inject
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc
from watcher.errors import SyncError
from watcher.link import LinkStatus, StreamState, backoff
from watcher.state import Batch, FolderState, chunked
from watcher.sync_wire import batch_attributes, batch_to_pb, channel_options, snapshot_chunk_pb
from watcher.telemetry import WatcherMetrics

log = structlog.get_logger(__name__)

REFUSALS = frozenset(
    {
        grpc.StatusCode.ALREADY_EXISTS,  # our --name is held by another live watcher
        grpc.StatusCode.UNAUTHENTICATED,  # a missing or wrong --token
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # over a limit of the aggregator's
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
"""The aggregator's answers that say "not you, not like this": retrying alone will not
help, so the watcher reports itself failing (/healthz 503) until a stream is accepted.
A broken link or a restarting aggregator is not one of them."""


@dataclass(frozen=True)
class Identity:
    """Who this watcher is, as told in its hello."""

    node: str
    epoch: str
    folder: str
    host: str
    http_port: int


class SyncClient(LinkStatus):
    """Keeps one Sync stream to one aggregator alive until `stop` is set.

    A watcher given several aggregators runs one client per target over the same
    folder state. Whichever client is ready first takes the pending changes as the
    next batch (into the state's resend ring); each client sends the ring's batches
    after its own position, so a slow or dead target holds back no other. A target
    that falls behind the whole ring gets a snapshot instead.

    Args:
        target: grpc://HOST:PORT, or grpcs://HOST:PORT with `credentials`.
        state: the folder state (owned by the event loop; shared by every client).
        wake: this client's own event, set whenever the state has news.
        credentials: TLS channel credentials, for a grpcs:// target.
    """

    def __init__(
        self,
        target: str,
        identity: Identity,
        state: FolderState,
        wake: asyncio.Event,
        *,
        token: str = "",
        heartbeat_interval: float = 2.0,
        keepalive: float = 10.0,
        max_batch: int = 1000,
        batch_delay: float = 0.0,
        batch_interval: float = 0.005,
        chunk_bytes: int = 1024 * 1024,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        metrics: WatcherMetrics | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._address = urlsplit(target).netloc
        self._credentials = credentials
        self._id = identity
        self._state = state
        self._wake = wake
        self._token = token
        self._heartbeat = heartbeat_interval
        self._keepalive = keepalive
        self._max_batch = max_batch
        self._batch_delay = batch_delay
        self._batch_interval = batch_interval
        self._chunk_bytes = chunk_bytes
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        super().__init__(metrics, target)
        self.sent_sequence = 0
        """The last sequence written to this target (batches after it are still owed)."""
        self._resync = False
        self.metrics.behind.labels(target).set_function(lambda: state.sequence - self.sent_sequence)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, sync, reconnect on failure; on `stop`, say goodbye and return."""
        failures = 0
        fields: dict[str, object]
        options = channel_options(self._keepalive, self._reconnect_min, self._reconnect_max)
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self._address, options=options)
        else:
            channel = grpc.aio.secure_channel(self._address, self._credentials, options=options)
        async with channel:
            stub = pb_grpc.WatcherSyncStub(channel)
            while not stop.is_set():
                self.stream_state = StreamState.CONNECTING
                try:
                    welcomed = await self._session(stub, stop)
                    if stop.is_set():
                        break
                    failures = 0 if welcomed else failures + 1
                    event, fields = "stream_ended", {}
                except (grpc.aio.AioRpcError, SyncError) as err:
                    failures += 1
                    code = err.code() if isinstance(err, grpc.aio.AioRpcError) else err.code
                    details = (
                        err.details() if isinstance(err, grpc.aio.AioRpcError) else err.details
                    )
                    refused = code in REFUSALS
                    if refused:
                        self.refusal = f"{code.name if code else 'PROTOCOL'}: {details}"
                    event = "stream_failed"
                    fields = {"code": str(code), "details": details, "refused": refused}
                self.reconnects.inc()
                self.stream_state = StreamState.BACKOFF
                delay = backoff(failures, self._reconnect_min, self._reconnect_max)
                # One line per attempt: the failures in a row, and when the next try comes.
                log.warning(
                    event, target=self.target, attempt=failures, retry_in=round(delay, 3), **fields
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        self.stream_state = StreamState.STOPPED

    async def _session(self, stub: pb_grpc.WatcherSyncStub, stop: asyncio.Event) -> bool:
        metadata = (("authorization", f"Bearer {self._token}"),) if self._token else None
        call = stub.Sync(metadata=metadata)
        try:
            return await self._converse(call, stop)
        except asyncio.InvalidStateError:
            # A write raced the end of the call (grpc raises this, not AioRpcError,
            # for "RPC already finished"): report why the call ended instead.
            raise SyncError(await call.code(), await call.details() or "stream closed") from None
        finally:
            call.cancel()

    async def _converse(self, call: grpc.aio.StreamStreamCall, stop: asyncio.Event) -> bool:
        st = self._state
        hello = pb.Hello(
            node=self._id.node,
            epoch=self._id.epoch,
            folder=self._id.folder,
            host=self._id.host,
            http_port=self._id.http_port,
            last_sequence=st.sequence,
        )
        await call.write(pb.WatcherMessage(hello=hello))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
            raise SyncError(await call.code(), await call.details() or "no welcome")
        welcome = first.welcome
        self._accepted("stream_accepted")
        self.stream_state = StreamState.SYNCING
        self._resync = False  # a request from a previous stream is answered below
        resend = st.batches_after(welcome.applied_sequence) if welcome.resume else None
        if resend is None:
            await self._send_snapshot(call)
        else:
            self.sent_sequence = welcome.applied_sequence
            for batch in resend:
                await call.write(batch_to_pb(batch))
                self.sent_sequence = batch.sequence
            log.info(
                "stream_resumed",
                target=self.target,
                applied_sequence=welcome.applied_sequence,
                resent=len(resend),
            )
        self.stream_state = StreamState.LIVE
        reader = asyncio.ensure_future(self._read_loop(call))
        try:
            await self._send_loop(call, stop, reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, SyncError):
                await reader
        return True

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise SyncError(await call.code(), await call.details() or "stream closed")
            # An Ack needs nothing from us: where to resume comes with each welcome.
            if msg.WhichOneof("kind") == "resync":
                log.info("resync_requested", reason=msg.resync.reason)
                self._resync = True
                self._wake.set()

    async def _send_loop(
        self,
        call: grpc.aio.StreamStreamCall,
        stop: asyncio.Event,
        reader: asyncio.Future[None],
    ) -> None:
        st = self._state
        wake = self._wake
        loop = asyncio.get_running_loop()
        last_batch = -math.inf
        # The end of the stream and a stop wake the loop like a change does: it
        # waits on one event, with no task or asyncio.wait per change.
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: wake.set())
        reader.add_done_callback(lambda _: wake.set())
        try:
            while True:
                if reader.done():
                    reader.result()  # raises why the stream ended
                    return
                if stop.is_set():
                    await call.write(pb.WatcherMessage(goodbye=pb.Goodbye()))
                    await call.done_writing()
                    # Let the aggregator apply the goodbye before the call is cancelled.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(call.code(), 2.0)
                    return
                if self._resync:
                    self._resync = False
                    await self._send_snapshot(call)
                    continue
                if st.pending:
                    # While changes keep coming, at most one batch per interval:
                    # the batch grows with the load, and a change after a quieter
                    # spell still goes at once.
                    hold = self._batch_delay or last_batch + self._batch_interval - loop.time()
                    if hold > 0:
                        await asyncio.sleep(hold)
                    # Into the ring, for every target (another client may have
                    # taken the changes meanwhile: then there is none).
                    st.take_batch(self._max_batch)
                if st.sequence > self.sent_sequence:
                    owed = st.batches_after(self.sent_sequence)
                    if owed is None:  # this target fell behind the whole ring
                        log.info("resend_ring_passed", target=self.target, sent=self.sent_sequence)
                        await self._send_snapshot(call)
                        continue
                    last_batch = loop.time()
                    for batch in owed:
                        await self._send_batch(call, batch)
                    continue
                wake.clear()
                if reader.done() or stop.is_set() or self._resync or st.pending:
                    continue  # it happened just before the clear
                if st.sequence > self.sent_sequence:
                    continue
                try:
                    async with asyncio.timeout(self._heartbeat):
                        await wake.wait()
                except TimeoutError:
                    await call.write(
                        pb.WatcherMessage(heartbeat=pb.Heartbeat(sequence=self.sent_sequence))
                    )
        finally:
            stopper.cancel()

    async def _send_batch(self, call: grpc.aio.StreamStreamCall, batch: Batch) -> None:
        msg = batch_to_pb(batch)
        tracer = self.metrics.tracer
        if tracer is None:
            await call.write(msg)
        else:
            with tracer.start_as_current_span(
                "watcher.batch",
                kind=SpanKind.PRODUCER,
                attributes=batch_attributes(self._id.node, batch),
            ) as span:
                msg.batch.traceparent, msg.batch.tracestate = inject(span)
                await call.write(msg)
        self.sent_sequence = batch.sequence
        self.count_sent(change.op.value for change in batch.changes)

    async def _send_snapshot(self, call: grpc.aio.StreamStreamCall) -> None:
        files, sequence = self._state.snapshot()
        started = time.perf_counter()
        for part in chunked(files, self._chunk_bytes):
            await call.write(snapshot_chunk_pb(part))
        await call.write(
            pb.WatcherMessage(snapshot_end=pb.SnapshotEnd(sequence=sequence, count=len(files)))
        )
        self.sent_sequence = sequence
        self.snapshots_sent.inc()
        log.info(
            "snapshot_sent",
            target=self.target,
            files=len(files),
            sequence=sequence,
            seconds=round(time.perf_counter() - started, 3),
        )
