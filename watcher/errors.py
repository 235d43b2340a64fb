"""The watcher's errors, under one root."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class WatcherError(Exception):
    """Root of every error the watcher raises."""


class StartupError(WatcherError):
    """The watcher cannot start (folder missing, port taken, ...)."""


class FolderError(WatcherError):
    """Why a path is not a usable folder.

    `state` is what the watcher reports (a `watcher.folder.FolderStatus` value):
    "missing" (nothing there, or not a folder), "unreadable" (permission denied)
    or "error" (anything else, such as a path too long for the kernel).
    """

    def __init__(self, reason: str, state: str) -> None:
        super().__init__(reason)
        self.state = state


class SyncError(WatcherError):
    """The aggregator ended or refused the gRPC stream."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'PROTOCOL'}: {details}")
        self.code = code
        self.details = details


class RejectedError(WatcherError):
    """The legacy aggregator refused a request as malformed (4xx): retrying will not help."""
