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


class StreamEndedError(AggregatorError):
    """A session was ended from the aggregator's side; the watcher reconnects."""


class SupersededError(StreamEndedError):
    """The same watcher process opened a newer stream: this one is dead."""


class ExpiredError(StreamEndedError):
    """The watcher was silent for the TTL: its files were removed."""


class ShuttingDownError(StreamEndedError):
    """The aggregator is stopping."""


class StartupError(Exception):
    """The aggregator cannot start: a listen address is taken or cannot be had.

    Not a domain error: it never reaches a peer; the process prints it and exits.
    """
