"""Domain errors as gRPC statuses: one table, used by every gRPC handler."""

from __future__ import annotations

from typing import NoReturn

import grpc

from aggregator.errors import (
    AggregatorError,
    ConflictError,
    ExpiredError,
    InvalidInputError,
    LimitExceededError,
    ShuttingDownError,
    SupersededError,
    UnauthenticatedError,
    UnknownWatcherError,
)

STATUS: dict[type[AggregatorError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownWatcherError: grpc.StatusCode.NOT_FOUND,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    ConflictError: grpc.StatusCode.ALREADY_EXISTS,
    SupersededError: grpc.StatusCode.ABORTED,
    ExpiredError: grpc.StatusCode.ABORTED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: AggregatorError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (its nearest class in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.UNKNOWN


async def abort(context: grpc.aio.ServicerContext, error: AggregatorError) -> NoReturn:
    """End the call with the status of `error` and its message."""
    await context.abort(status_of(error), str(error))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
