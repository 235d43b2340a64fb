"""Domain errors of the aggregator, under one root; only adapters translate them."""

from __future__ import annotations


class AggregatorError(Exception):
    """Root of every error the aggregator core raises."""


class InvalidInputError(AggregatorError):
    """A peer sent something malformed; nothing was changed."""


class UnknownWatcherError(AggregatorError):
    """An operation named a watcher (or a snapshot) the index does not hold."""


class LimitExceededError(AggregatorError):
    """A configured limit (watchers, files, readers, sizes) would be exceeded."""


class UnauthenticatedError(AggregatorError):
    """Ingestion without the shared token, or with a wrong one."""


class ConflictError(AggregatorError):
    """A watcher name is held by another live watcher: nobody overwrites another's files."""
