"""What both clients share: the retry backoff, the stream state and the refusal (watcher.link)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from watcher.client import Identity, SyncClient
from watcher.legacy_client import LegacyClient
from watcher.link import Client, LinkStatus, StreamState, backoff
from watcher.state import FolderState
from watcher.telemetry import WatcherMetrics


@pytest.mark.parametrize(
    ("failures", "bound"), [(0, 0.1), (1, 0.2), (3, 0.8), (10, 5.0), (5000, 5.0)]
)
def test_backoff_is_full_jitter_up_to_a_capped_exponential(failures: int, bound: float) -> None:
    delays = [backoff(failures, 0.1, 5.0) for _ in range(200)]
    assert all(0 <= d <= bound for d in delays)
    assert max(delays) > bound / 2  # spread over the range, not pinned to an end


def test_a_refusal_lasts_until_accepted_and_the_state_is_exported() -> None:
    registry = CollectorRegistry()
    link = LinkStatus(WatcherMetrics(registry), "grpc://a:1")
    assert link.stream_state is StreamState.CONNECTING
    link.refusal = "ALREADY_EXISTS: taken"
    link.stream_state = StreamState.BACKOFF
    assert registry.get_sample_value(
        "filewatch_watcher_stream_state",
        {"filewatch_watcher_stream_state": "backoff", "target": "grpc://a:1"},
    )
    link._accepted("stream_accepted")
    assert link.refusal is None


def test_both_clients_are_clients() -> None:
    state, wake = FolderState(), asyncio.Event()
    identity = Identity(node="n", epoch="e", folder="/f", host="h", http_port=1)
    clients: list[Client] = [
        SyncClient("grpc://127.0.0.1:1", identity, state, wake),
        LegacyClient("http://127.0.0.1:1", "e", 1, state, wake),
    ]
    assert [c.stream_state for c in clients] == [StreamState.CONNECTING] * 2
    assert [c.refusal for c in clients] == [None, None]
