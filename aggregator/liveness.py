"""Which watchers are connected, and when a vanished one's files must go."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _State:
    protocol: str
    deadline: float | None  # None while a stream is open


class Liveness:
    """Tracks watchers by node: connected, or vanished with a deadline.

    Pure: the caller passes the clock. A watcher whose stream breaks keeps its
    files until `now + ttl`, so that a short blip causes no flapping.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._nodes: dict[str, _State] = {}

    def connected(self, node: str, protocol: str) -> None:
        """A stream for `node` is open (or a hello arrived)."""
        self._nodes[node] = _State(protocol, None)

    def seen(self, node: str, protocol: str, now: float) -> None:
        """A periodic sign of life (legacy hello): the deadline moves on."""
        self._nodes[node] = _State(protocol, now + self.ttl)

    def vanished(self, node: str, now: float) -> None:
        """The stream broke without a goodbye: the files go at now + ttl."""
        state = self._nodes.get(node)
        if state is not None:
            state.deadline = now + self.ttl

    def forget(self, node: str) -> None:
        """The watcher said goodbye or was evicted."""
        self._nodes.pop(node, None)

    def expired(self, now: float) -> list[str]:
        """Nodes whose deadline has passed; they are forgotten."""
        gone = [n for n, s in self._nodes.items() if s.deadline is not None and s.deadline <= now]
        for node in gone:
            del self._nodes[node]
        return gone

    def protocol_of(self, node: str) -> str | None:
        """The protocol of a known node, or None."""
        state = self._nodes.get(node)
        return state.protocol if state else None

    def count_by_protocol(self) -> dict[str, int]:
        """Watchers known now, by protocol (connected or within their TTL)."""
        counts: dict[str, int] = {}
        for state in self._nodes.values():
            counts[state.protocol] = counts.get(state.protocol, 0) + 1
        return counts
