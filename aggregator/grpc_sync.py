"""gRPC adapter of the streaming ingestion protocol: `filewatch.v1.WatcherSync/Sync`.

It maps messages to `sessions` calls and their answers back to messages, and
domain errors to statuses (`grpc_status`); every decision is the session's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc
import structlog
from google.protobuf.message import DecodeError

from aggregator.auth import check_bearer
from aggregator.errors import AggregatorError, InvalidInputError, StreamEndedError
from aggregator.grpc_status import abort, status_of
from aggregator.index import Meta, Op, pack_meta
from aggregator.names import invalid_name_reason
from aggregator.sessions import Ack, Hello, Resync, Session, Sessions, Welcome
from aggregator.telemetry import Metrics
from gen import filewatch_pb2 as pb
from gen import filewatch_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

_OPS = {pb.OP_ADD: Op.ADD, pb.OP_REMOVE: Op.REMOVE, pb.OP_MODIFY: Op.MODIFY}


def authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` metadata value of a call, if any."""
    found = None
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            found = value
    return found


def changes_from_pb(batch: pb.Batch) -> list[tuple[Op, bytes, Meta]]:
    """Validate and convert a batch's changes; nothing is applied on error."""
    out = []
    for i, ch in enumerate(batch.changes):
        f, op = ch.file, _OPS.get(ch.op)
        if op is None:
            raise InvalidInputError(f"change {i}: unknown op {ch.op}")
        name = f.name
        reason = invalid_name_reason(name)
        if reason:
            raise InvalidInputError(f"change {i}: {reason}")
        out.append((op, name, pack_meta(f.size, f.mtime_ns)))
    return out


def files_from_pb(chunk: pb.SnapshotChunk) -> list[tuple[bytes, Meta]]:
    """Validate and convert a snapshot chunk."""
    out = []
    for i, f in enumerate(chunk.files):
        name = f.name
        reason = invalid_name_reason(name)
        if reason:
            raise InvalidInputError(f"snapshot file {i}: {reason}")
        out.append((name, pack_meta(f.size, f.mtime_ns)))
    return out


def reply_to_pb(reply: Welcome | Ack | Resync) -> pb.AggregatorMessage:
    """A session's answer as a message."""
    if isinstance(reply, Welcome):
        welcome = pb.Welcome(
            epoch=reply.epoch, resume=reply.resume, applied_sequence=reply.applied_sequence
        )
        return pb.AggregatorMessage(welcome=welcome)
    if isinstance(reply, Ack):
        return pb.AggregatorMessage(ack=pb.Ack(applied_sequence=reply.applied_sequence))
    resync = pb.Resync(reason=reply.reason, applied_sequence=reply.applied_sequence)
    return pb.AggregatorMessage(resync=resync)


class SyncService(pb_grpc.WatcherSyncServicer):
    """One `Sync` stream per watcher process, each a session of `sessions`."""

    def __init__(
        self,
        sessions: Sessions,
        metrics: Metrics,
        *,
        token: str = "",
        hello_timeout: float = 10.0,
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics
        self._token = token
        self._hello_timeout = hello_timeout

    # grpc.aio allows a streaming handler to use context.read()/write() and
    # return None; the generated stub only knows the iterator style.
    async def Sync(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext,
    ) -> None:
        sessions = self._sessions
        session = sessions.open()
        clean = False
        code = "OK"
        started = time.perf_counter()
        try:
            check_bearer(self._token, authorization(context.invocation_metadata()))
            clean = await sessions.serve(session, lambda: self._converse(session, context))
        except AggregatorError as err:
            code = status_of(err).name
            if not isinstance(err, StreamEndedError):  # ended by us: not the peer's error
                self._metrics.errors.labels(type(err).__name__).inc()
                log.warning("sync_rejected", node=session.node, error=str(err), code=code)
            await abort(context, err)
        finally:
            sessions.close(session, clean)
            self._metrics.grpc_requests.labels("Sync", code).inc()
            self._metrics.grpc_duration.labels("Sync").observe(time.perf_counter() - started)

    async def _converse(self, session: Session, context: grpc.aio.ServicerContext) -> bool:
        """Hello, then messages until the end; True on goodbye or half-close."""
        sessions = self._sessions
        try:
            async with asyncio.timeout(self._hello_timeout):
                first = await _read(context)
        except TimeoutError:
            raise InvalidInputError("no hello within the hello timeout") from None
        if first is grpc.aio.EOF:
            return False
        if not isinstance(first, pb.WatcherMessage) or first.WhichOneof("kind") != "hello":
            raise InvalidInputError("the first message of a Sync stream must be a hello")
        h = first.hello
        welcome = sessions.hello(session, Hello(h.node, h.epoch, h.folder, h.last_sequence))
        await context.write(reply_to_pb(welcome))
        while True:
            msg = await _read(context)
            sessions.heard(session)
            if msg is grpc.aio.EOF:
                # grpc also ends the reads of a peer that died (SIGKILL, reset)
                # with EOF: tell a real half-close apart before removing files.
                return await self._half_closed(session, context)
            assert isinstance(msg, pb.WatcherMessage)
            kind = msg.WhichOneof("kind")
            reply: Welcome | Ack | Resync | None = None
            if kind == "batch":
                b = msg.batch
                reply = sessions.batch(
                    session,
                    b.sequence,
                    changes_from_pb(b),
                    observed_ns=b.observed_unix_ns,
                    traceparent=b.traceparent,
                    tracestate=b.tracestate,
                )
            elif kind == "snapshot_chunk":
                sessions.chunk(session, files_from_pb(msg.snapshot_chunk))
            elif kind == "snapshot_end":
                end = msg.snapshot_end
                reply = sessions.snapshot_end(session, end.sequence, end.count)
            elif kind == "heartbeat":
                beat = msg.heartbeat
                reply = sessions.heartbeat(session, beat.sequence, beat.want_ack)
            elif kind == "goodbye":
                return True
            elif kind == "hello":
                raise InvalidInputError("hello sent twice on one stream")
            else:
                raise InvalidInputError("empty message")
            if reply is not None:
                await context.write(reply_to_pb(reply))

    async def _half_closed(self, session: Session, context: grpc.aio.ServicerContext) -> bool:
        """Whether an EOF is a clean half-close, not a cancelled or broken call.

        A half-closed call can still be written to; on a cancelled or broken
        one the write fails, or grpc cancels this handler meanwhile.
        """
        try:
            await context.write(reply_to_pb(Ack(self._sessions.applied(session))))
        except Exception:  # the call is gone: not a clean close
            return False
        return True


async def _read(context: grpc.aio.ServicerContext) -> object:
    """The next message, or grpc.aio.EOF."""
    try:
        return await context.read()
    except DecodeError as exc:
        raise InvalidInputError(f"malformed message: {exc}") from exc
