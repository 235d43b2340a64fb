"""The standard gRPC services beside ours: health and reflection."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aggregator.app import Aggregator
from tests.aggregator.grpc_support import TIMEOUT

# ---------------------------------------------------------------- health, reflection


async def test_health_is_serving_then_not_serving_on_stop(
    aggregator: Aggregator, channel: Any
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "filewatch.v1.FileIndex", "filewatch.v1.WatcherSync"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(aggregator.stop())
    second = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    await asyncio.wait_for(stopping, TIMEOUT)

    try:
        after = await asyncio.wait_for(
            stub.Check(health_pb2.HealthCheckRequest(service="")), TIMEOUT
        )
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    else:
        assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_and_describes_the_services(channel: Any) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listing = await asyncio.wait_for(call.read(), TIMEOUT)
    services = {s.name for s in listing.list_services_response.service}
    assert {
        "filewatch.v1.FileIndex",
        "filewatch.v1.WatcherSync",
        "grpc.health.v1.Health",
    } <= services

    await call.write(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="filewatch.v1.FileIndex")
    )
    described = await asyncio.wait_for(call.read(), TIMEOUT)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        (service.name, method.name)
        for file in files
        if file.package == "filewatch.v1"
        for service in file.service
        for method in service.method
    }
    assert {("FileIndex", "ListFiles"), ("FileIndex", "WatchFiles")} <= methods
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), TIMEOUT) == grpc.StatusCode.OK
