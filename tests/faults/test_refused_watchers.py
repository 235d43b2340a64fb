"""A watcher the aggregator refuses says so: /healthz 503 "failing" with the reason.

- gRPC: two real watchers with one --name against a real aggregator; the second
  is refused ALREADY_EXISTS until the first leaves.
- Legacy: a real watcher against a fake aggregator (tests.faults.fake_aggregator)
  that answers its hellos 409, then 200.
Each refused attempt is one warning line, numbered, with the delay to the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    Watcher,
    WatcherFactory,
    fill,
    wait_listed,
)
from tests.faults.fake_aggregator import FakeLegacyAggregator, fake_legacy_aggregator
from tests.support import Reply, http_request, wait_for

RECONNECT_MAX = 0.5
"""The watchers' --reconnect-max (tests.faults.conftest.WATCHER_DEFAULTS)."""
HELLO_INTERVAL = 0.5
"""The watchers' --hello-interval (tests.faults.conftest.WATCHER_DEFAULTS)."""


@pytest.fixture
def fake() -> Iterator[FakeLegacyAggregator]:
    """A fake legacy aggregator (set up before the watchers, so closed after them)."""
    with fake_legacy_aggregator() as agg:
        yield agg


def _healthz(w: Watcher) -> Reply:
    return http_request(w.http_port, "GET", "/healthz")


@pytest.mark.timeout(60)
def test_a_watcher_refused_its_name_reports_failing_until_it_gets_in(
    start_aggregator: AggregatorFactory, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    agg = start_aggregator(ttl=30.0)
    first, second = tmp_path / "first", tmp_path / "second"
    fill(first, 3, "first")
    fill(second, 4, "second")
    w1 = start_watcher(first, agg.grpc_url, name="same")
    wait_listed(agg, "same", first, what="the first watcher", timeout=SYNC_TIMEOUT)
    assert _healthz(w1).status == 200

    w2 = start_watcher(second, agg.grpc_url, name="same")
    reply = wait_for(
        lambda: _healthz(w2), SYNC_TIMEOUT, until=lambda r: r.status == 503, what="503 failing"
    )
    health = reply.json()
    assert health["status"] == "failing", health
    assert health["reason"].startswith("ALREADY_EXISTS: "), health
    assert "watcher name 'same' is held by another live stream" in health["reason"], health
    refusals = wait_for(
        lambda: w2.proc.events("stream_failed", refused=True),
        SYNC_TIMEOUT,
        until=lambda found: len(found) >= 3,
        what="three refused attempts logged",
    )
    assert [e["attempt"] for e in refusals[:3]] == [1, 2, 3], refusals
    for e in refusals:
        assert e["level"] == "warning" and e["code"] == "StatusCode.ALREADY_EXISTS", e
        assert 0 <= e["retry_in"] <= RECONNECT_MAX, e
    assert _healthz(w2).status == 503, "still refused, still failing"
    assert _healthz(w1).json()["status"] == "ok"

    w1.proc.terminate()  # SIGTERM: the first says goodbye and frees the name
    reply = wait_for(
        lambda: _healthz(w2), SYNC_TIMEOUT, until=lambda r: r.status == 200, what="200 ok"
    )
    assert reply.json()["status"] == "ok" and "reason" not in reply.json(), reply
    wait_listed(agg, "same", second, what="the second watcher, let in", timeout=SYNC_TIMEOUT)
    accepted = w2.proc.wait_event("stream_accepted")
    assert "is held by another live stream" in accepted["previous_refusal"]


@pytest.mark.timeout(60)
def test_a_legacy_watcher_whose_hello_is_refused_reports_failing_until_accepted(
    fake: FakeLegacyAggregator, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "w"
    fill(folder, 2)
    fake.refuse_hello(409, "instance held by another address")
    w = start_watcher(folder, fake.url)
    reply = wait_for(
        lambda: _healthz(w), SYNC_TIMEOUT, until=lambda r: r.status == 503, what="503 failing"
    )
    health = reply.json()
    assert health["status"] == "failing", health
    assert "POST /hello answered 409" in health["reason"], health
    assert "instance held by another address" in health["reason"], health
    refusals = wait_for(
        lambda: w.proc.events("hello_failed", refused=True),
        SYNC_TIMEOUT,
        until=lambda found: len(found) >= 2,
        what="two refused hellos logged",
    )
    assert [e["attempt"] for e in refusals[:2]] == [1, 2], refusals
    assert all(e["level"] == "warning" and e["retry_in"] == HELLO_INTERVAL for e in refusals)

    fake.accept_hello()
    reply = wait_for(
        lambda: _healthz(w), SYNC_TIMEOUT, until=lambda r: r.status == 200, what="200 ok"
    )
    assert reply.json()["status"] == "ok" and "reason" not in reply.json(), reply
    assert w.proc.wait_event("hello_accepted")["previous_refusal"] == health["reason"]
