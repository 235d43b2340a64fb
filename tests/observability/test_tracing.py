"""Traces across processes: the aggregator's apply span is a child of the watcher's batch span.

The test runs a real OTLP/gRPC trace receiver (the Collector's TraceService) on
127.0.0.1:0, and an aggregator and a watcher as separate processes exporting to
it through the standard OTEL_* environment. A file change must give a
"watcher.batch" span on the watcher and an "aggregator.apply_batch" span on the
aggregator, in the same trace, the second the child of the first: carried in
the gRPC batch message, or in the legacy PATCH's traceparent header.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.observability.conftest import (
    Watcher,
    start_aggregator,
    start_watcher,
)
from tests.support import HOST, ProcessTracker, wait_for

TRACE_TIMEOUT = 20.0
"""Bound on "a change made -> both spans received" (spans are exported every 100 ms)."""

AttributeValue = str | int | float | bool


def _value(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    assert kind in ("string_value", "int_value", "double_value", "bool_value"), value
    result: AttributeValue = getattr(value, kind)
    return result


def _attributes(pairs: Any) -> dict[str, AttributeValue]:
    items: list[KeyValue] = list(pairs)
    return {kv.key: _value(kv.value) for kv in items}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver got it, ids in hex."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, AttributeValue]


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The OTLP TraceService: keeps every span exported to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Store the spans of one export call."""
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                received.extend(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                    )
                    for span in scope_spans.spans
                )
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            return list(self._spans)


@dataclass(frozen=True)
class Receiver:
    """A running OTLP/gRPC receiver and the environment that points a process at it."""

    servicer: TraceReceiver
    port: int

    @property
    def env(self) -> dict[str, str]:
        """The standard OTEL_* settings for our processes."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }


@pytest.fixture
def otlp_receiver() -> Iterator[Receiver]:
    """A real OTLP/gRPC trace receiver on 127.0.0.1:0 (request it before `processes`,
    so that it outlives them and gets the spans they flush on exit)."""
    servicer = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{HOST}:0")
    assert port > 0
    server.start()
    try:
        yield Receiver(servicer, port)
    finally:
        server.stop(grace=1).wait(5)


def _linked_pair(
    spans: list[ReceivedSpan],
) -> tuple[ReceivedSpan, ReceivedSpan] | None:
    """A (watcher batch span, aggregator apply span) pair where the second is the child."""
    batches = {
        s.span_id: s
        for s in spans
        if s.name == "watcher.batch" and s.service == "filewatch-watcher"
    }
    for span in spans:
        if span.name == "aggregator.apply_batch" and span.service == "filewatch-aggregator":
            parent = batches.get(span.parent_span_id)
            if parent is not None:
                return parent, span
    return None


def _change_until_linked(receiver: Receiver, watcher: Watcher) -> tuple[ReceivedSpan, ReceivedSpan]:
    """Create files until a batch's two spans arrive, linked.

    A file created while the watcher is still syncing goes in its snapshot,
    which has no batch span: hence a new file on each poll until then. On a
    timeout the failure shows every span received (name, service, ids).
    """
    created = itertools.count()

    def probe() -> list[ReceivedSpan]:
        spans = receiver.servicer.spans()
        if _linked_pair(spans) is None:
            (watcher.folder / f"traced-{next(created):04d}.txt").write_text("traced\n")
        return spans

    spans = wait_for(
        probe,
        TRACE_TIMEOUT,
        until=lambda spans: _linked_pair(spans) is not None,
        what="a watcher.batch span and its aggregator.apply_batch child",
        interval=0.25,
    )
    pair = _linked_pair(spans)
    assert pair is not None
    return pair


def _check_pair(batch: ReceivedSpan, apply: ReceivedSpan, *, node: str, protocol: str) -> None:
    assert apply.trace_id == batch.trace_id != "0" * 32
    assert apply.parent_span_id == batch.span_id
    assert batch.kind == Span.SpanKind.SPAN_KIND_PRODUCER
    assert apply.kind == Span.SpanKind.SPAN_KIND_CONSUMER

    attrs = batch.attributes
    assert attrs["filewatch.node"] == node, attrs
    count, first, last = (
        attrs["filewatch.count"],
        attrs["filewatch.sequence.first"],
        attrs["filewatch.sequence.last"],
    )
    assert isinstance(count, int) and count >= 1, attrs
    assert isinstance(first, int) and isinstance(last, int), attrs
    assert 0 < first <= last, attrs

    # The apply is of a batch the watcher sent: its sequence is in the span's range.
    assert apply.attributes["filewatch.protocol"] == protocol, apply.attributes
    sequence = apply.attributes["filewatch.sequence"]
    assert isinstance(sequence, int) and first <= sequence <= last, (apply.attributes, attrs)


def test_grpc_batch_span_is_parent_of_apply_span(
    otlp_receiver: Receiver, processes: ProcessTracker, tmp_path: Path
) -> None:
    """gRPC watcher: the trace context rides in the batch message."""
    aggregator = start_aggregator(processes, env=otlp_receiver.env)
    watcher = start_watcher(
        processes, tmp_path / "watched", aggregator.grpc_url, env=otlp_receiver.env
    )
    batch, apply = _change_until_linked(otlp_receiver, watcher)
    _check_pair(batch, apply, node=watcher.node, protocol="grpc")
    # One batch, one apply, of the same changes.
    assert apply.attributes["filewatch.node"] == watcher.node
    assert apply.attributes["filewatch.count"] == batch.attributes["filewatch.count"]


def test_legacy_patch_span_is_parent_of_apply_span(
    otlp_receiver: Receiver, processes: ProcessTracker, tmp_path: Path
) -> None:
    """Legacy (HTTP) watcher: the trace context rides in the PATCH's traceparent header."""
    aggregator = start_aggregator(processes, env=otlp_receiver.env)
    watcher = start_watcher(
        processes, tmp_path / "watched", aggregator.http_url, env=otlp_receiver.env
    )
    batch, apply = _change_until_linked(otlp_receiver, watcher)
    # A legacy watcher knows itself by its instance id (the aggregator names it HOST:PORT).
    # The aggregator applies a PATCH one seqno at a time: each apply is a child of it.
    assert watcher.instance
    _check_pair(batch, apply, node=watcher.instance, protocol="legacy")
    assert apply.attributes["filewatch.node"] == f"{HOST}:{watcher.http_port}"
