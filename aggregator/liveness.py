"""Which watchers are connected, and when a vanished one's files must go."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _State:
    protocol: str
    deadline: float


class Liveness:
    """Tracks watchers by node, each with a deadline: its files go when it passes.

    Pure: the caller passes the clock. Every sign of life (a message on an open
    stream, a legacy hello) moves the deadline to `now + ttl`; a stream that
    breaks keeps its files until `now + ttl` too, so that a short blip causes no
    flapping. A watcher that is silent on an open stream (frozen: SIGSTOP, a
    hung host) therefore goes `ttl` after its last message, whatever TCP says.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._nodes: dict[str, _State] = {}

    def seen(self, node: str, protocol: str, now: float, at_least: float = 0.0) -> None:
        """A stream opened, or a periodic sign of life (legacy hello).

        The deadline becomes `now` plus the TTL, or plus `at_least` if longer.
        """
        self._nodes[node] = _State(protocol, now + max(self.ttl, at_least))

    def heard(self, node: str, now: float) -> None:
        """A message on the node's open stream: the deadline moves on (hot path)."""
        state = self._nodes.get(node)
        if state is not None:
            state.deadline = now + self.ttl

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
        gone = [n for n, s in self._nodes.items() if s.deadline <= now]
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
