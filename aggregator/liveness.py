"""Which watchers are connected, and when a vanished one's files must go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

LATE_PERIODS = 1.5
"""A watcher whose signs of life are periodic is lost once this many periods pass without
one: a hello a little late is no break."""


@dataclass(slots=True)
class _State:
    protocol: str
    deadline: float
    last_seen: float  # the clock's time of the last sign of life
    period: float = 0.0  # > 0: signs of life due every `period` s (legacy hellos); 0: a stream
    open: bool = True  # a stream: open, or broken (its files wait for the TTL)


class Presence(NamedTuple):
    """What is known of a watcher's link: its protocol, whether it is up, when it was heard."""

    protocol: str
    connected: bool
    last_seen: float  # on the clock passed to Liveness


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

    def seen(
        self, node: str, protocol: str, now: float, at_least: float = 0.0, period: float = 0.0
    ) -> None:
        """A stream opened, or a periodic sign of life (legacy hello, due every `period` s).

        The deadline becomes `now` plus the TTL, or plus `at_least` if longer.
        """
        self._nodes[node] = _State(protocol, now + max(self.ttl, at_least), now, period)

    def heard(self, node: str, now: float) -> None:
        """A message on the node's open stream: the deadline moves on (hot path)."""
        state = self._nodes.get(node)
        if state is not None:
            state.deadline = now + self.ttl
            state.last_seen = now

    def vanished(self, node: str, now: float) -> None:
        """The stream broke without a goodbye: the files go at now + ttl."""
        state = self._nodes.get(node)
        if state is not None:
            state.deadline = now + self.ttl
            state.open = False

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

    def presence(self, node: str, now: float) -> Presence | None:
        """A known node's link, or None: connected while its stream is open or its hellos come.

        A periodic watcher is lost once `LATE_PERIODS` periods pass without a sign
        of life; a streaming one once its stream breaks.
        """
        state = self._nodes.get(node)
        if state is None:
            return None
        if state.period > 0:
            connected = now - state.last_seen <= LATE_PERIODS * state.period
        else:
            connected = state.open
        return Presence(state.protocol, connected, state.last_seen)

    def count_by_protocol(self) -> dict[str, int]:
        """Watchers known now, by protocol (connected or within their TTL)."""
        counts: dict[str, int] = {}
        for state in self._nodes.values():
            counts[state.protocol] = counts.get(state.protocol, 0) + 1
        return counts
