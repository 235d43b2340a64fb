"""The filewatch aggregator: one sorted list of every file of every watcher."""

from aggregator.config import AggregatorConfig
from aggregator.errors import (
    AggregatorError,
    InvalidInputError,
    LimitExceededError,
    UnauthenticatedError,
    UnknownWatcherError,
)
from aggregator.index import BatchStatus, Change, Entry, Event, EventKind, Index, Op, pack_meta

__all__ = [
    "AggregatorConfig",
    "AggregatorError",
    "BatchStatus",
    "Change",
    "Entry",
    "Event",
    "EventKind",
    "Index",
    "InvalidInputError",
    "LimitExceededError",
    "Op",
    "UnauthenticatedError",
    "UnknownWatcherError",
    "pack_meta",
]
