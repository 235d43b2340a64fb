"""Unit tests of the Store: publishing to WatchFiles readers, history, limits."""

from __future__ import annotations

import asyncio

import pytest

from aggregator.errors import LimitExceededError
from aggregator.index import BatchStatus, Change, Event, Index, Op, pack_meta
from aggregator.store import Store, Subscriber
from aggregator.telemetry import Metrics

WAIT = 5.0  # seconds; only reached if a test is broken


def make_store(
    *, max_readers: int = 1000, reader_queue: int = 10_000, history: int = 10_000
) -> Store:
    return Store(
        Index(), Metrics(), max_readers=max_readers, reader_queue=reader_queue, history=history
    )


def state(sub: Subscriber) -> tuple[str | None, bool]:
    """Why a reader was closed (None: open) and whether it was too slow."""
    return sub.reason, sub.slow


def sample(store: Store, name: str, labels: dict[str, str] | None = None) -> float:
    value = store.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def snapshot(
    store: Store, node: str, names: list[bytes], *, sequence: int = 0
) -> tuple[Event, ...]:
    store.index.begin_snapshot(node, "e")
    store.index.extend_snapshot(node, [(n, pack_meta(1, 1)) for n in names])
    return tuple(store.commit_snapshot(node, sequence, "initial"))


def add(store: Store, node: str, sequence: int, *names: bytes) -> tuple[Event, ...]:
    result = store.apply_batch(
        node, "e", sequence, [Change(Op.ADD, n, pack_meta(1, 1)) for n in names], protocol="grpc"
    )
    assert result.status is BatchStatus.APPLIED
    return result.events


async def read(sub: Subscriber, count: int) -> list[Event | None]:
    """Read `count` items from a reader's queue, as a WatchFiles handler would."""
    return [await sub.queue.get() for _ in range(count)]


async def test_subscriber_receives_every_event_in_version_order() -> None:
    store = make_store()
    sub = store.subscribe()
    reader = asyncio.create_task(read(sub, 7))
    published: list[Event] = []
    published += snapshot(store, "n1", [b"a", b"b", b"c"])
    published += snapshot(store, "n2", [b"a"])
    published += add(store, "n1", 1, b"d")
    duplicate = store.apply_batch("n1", "e", 1, [Change(Op.ADD, b"x")], protocol="grpc")
    assert duplicate.status is BatchStatus.DUPLICATE
    published += add(store, "n1", 2, b"a", b"e")  # "a" is present as is: no event for it
    store.index.begin_snapshot("n2", "e")
    store.index.extend_snapshot("n2", [])
    published += store.commit_snapshot("n2", 0, "resync")  # removes n2's "a"
    store.remove_watcher("n2")  # nothing left to remove: no event
    received = await asyncio.wait_for(reader, WAIT)
    assert received == published
    assert [ev.version for ev in published] == list(range(1, 8))
    assert store.index.version == 7
    assert sub.queue.empty()
    assert sample(store, "filewatch_changes_applied_total", {"op": "add"}) == 6
    assert sample(store, "filewatch_changes_applied_total", {"op": "remove"}) == 1
    assert sample(store, "filewatch_duplicate_batches_total") == 1
    assert sample(store, "filewatch_files") == 5
    assert sample(store, "filewatch_watch_readers") == 1


async def test_reader_subscribed_late_sees_only_later_events() -> None:
    store = make_store()
    snapshot(store, "n", [b"a", b"b"])
    sub = store.subscribe()
    events = add(store, "n", 1, b"c")
    assert await asyncio.wait_for(read(sub, 1), WAIT) == list(events)
    assert sub.queue.empty()


async def test_slow_reader_is_dropped_fast_reader_keeps_going() -> None:
    store = make_store(reader_queue=3)
    snapshot(store, "n", [])
    fast, slow = store.subscribe(), store.subscribe()
    assert store.reader_count == 2
    for sequence, name in enumerate([b"a", b"b", b"c"], start=1):
        events = add(store, "n", sequence, name)
        assert await asyncio.wait_for(read(fast, 1), WAIT) == list(events)
    assert slow.queue.qsize() == 3  # full, not yet over
    assert state(slow) == (None, False)
    assert sample(store, "filewatch_watch_readers_dropped_total") == 0

    events = add(store, "n", 4, b"d")  # one more than the slow reader's queue holds
    assert await asyncio.wait_for(read(fast, 1), WAIT) == list(events)
    reason, was_slow = state(slow)
    assert was_slow
    assert reason is not None
    assert "slow" in reason
    # Its unread events are dropped and the sentinel wakes it.
    assert await asyncio.wait_for(read(slow, 1), WAIT) == [None]
    assert slow.queue.empty()
    # Dropped, it is still a reader (its call is still open) until it unsubscribes.
    assert store.reader_count == 2
    assert sample(store, "filewatch_watch_readers_dropped_total") == 1
    assert sample(store, "filewatch_watch_readers") == 2
    store.unsubscribe(slow)
    assert store.reader_count == 1
    assert sample(store, "filewatch_watch_readers") == 1

    # Nothing more reaches the dropped reader; the fast one is unaffected.
    events = add(store, "n", 5, b"e")
    assert slow.queue.empty()
    assert await asyncio.wait_for(read(fast, 1), WAIT) == list(events)
    assert state(fast) == (None, False)
    assert sample(store, "filewatch_watch_readers_dropped_total") == 1


async def test_a_reader_that_falls_behind_wakes_with_the_sentinel_when_dropped() -> None:
    store = make_store(reader_queue=2)
    snapshot(store, "n", [])
    sub = store.subscribe()
    first = add(store, "n", 1, b"a", b"b")  # fills the queue
    assert await asyncio.wait_for(read(sub, 2), WAIT) == list(first)
    waiting = asyncio.Event()

    async def blocked_reader() -> Event | None:
        waiting.set()
        return await sub.queue.get()  # the queue is empty: this suspends

    task = asyncio.create_task(blocked_reader())
    await asyncio.wait_for(waiting.wait(), WAIT)
    assert not task.done()
    # One publish bigger than the queue still reaches a reader that kept up.
    add(store, "n", 2, b"c", b"d", b"e")
    woken = await asyncio.wait_for(task, WAIT)
    assert woken is not None and woken.entry.raw_name == b"c"
    assert state(sub) == (None, False)
    # d and e unread: as many as the queue holds, so the next publish drops it.
    add(store, "n", 3, b"f")
    assert state(sub)[1] is True
    assert await asyncio.wait_for(sub.queue.get(), WAIT) is None
    assert sub.queue.empty()
    assert sample(store, "filewatch_watch_readers_dropped_total") == 1


async def test_close_readers_wakes_everyone_without_marking_slow() -> None:
    store = make_store()
    snapshot(store, "n", [b"a"])
    subs = [store.subscribe() for _ in range(3)]
    add(store, "n", 1, b"b")
    store.close_readers("shutting down")
    for sub in subs:
        assert await asyncio.wait_for(read(sub, 1), WAIT) == [None]
        assert state(sub) == ("shutting down", False)
    assert store.reader_count == 3  # until their calls end
    add(store, "n", 2, b"c")
    assert all(sub.queue.empty() for sub in subs)  # closed: fed nothing more
    for sub in subs:
        store.unsubscribe(sub)
    assert store.reader_count == 0
    assert sample(store, "filewatch_watch_readers") == 0
    assert sample(store, "filewatch_watch_readers_dropped_total") == 0


async def test_max_readers() -> None:
    store = make_store(max_readers=2)
    first, _second = store.subscribe(), store.subscribe()
    with pytest.raises(LimitExceededError):
        store.subscribe()
    assert store.reader_count == 2
    store.unsubscribe(first)
    store.unsubscribe(first)  # idempotent
    assert store.reader_count == 1
    store.subscribe()
    assert store.reader_count == 2
    assert sample(store, "filewatch_watch_readers") == 2


async def test_unsubscribed_reader_gets_nothing() -> None:
    store = make_store()
    snapshot(store, "n", [])
    sub = store.subscribe()
    store.unsubscribe(sub)
    add(store, "n", 1, b"a")
    assert sub.queue.empty()
    assert state(sub) == (None, False)


@pytest.fixture
def five_events() -> Store:
    """A store whose history of 3 holds versions 3, 4 and 5 of 5."""
    store = make_store(history=3)
    snapshot(store, "n", [b"a", b"b"])
    add(store, "n", 1, b"c")
    add(store, "n", 2, b"d", b"e")
    assert store.index.version == 5
    return store


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        pytest.param(5, [], id="current"),
        pytest.param(4, [5], id="one-behind"),
        pytest.param(2, [3, 4, 5], id="oldest-reachable"),
        pytest.param(1, None, id="history-lost"),
        pytest.param(0, None, id="from-zero-lost"),
        pytest.param(6, None, id="future"),
    ],
)
async def test_history_since(five_events: Store, version: int, expected: list[int] | None) -> None:
    got = five_events.history_since(version)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert [ev.version for ev in got] == expected
        assert all(isinstance(ev, Event) for ev in got)


async def test_history_since_current_is_empty_tuple_and_full_history_reaches_zero() -> None:
    store = make_store()
    assert store.history_since(0) == ()
    events = snapshot(store, "n", [b"a", b"b"])
    assert store.history_since(2) == ()
    assert store.history_since(0) == events
    assert store.history_since(1) == events[1:]


async def test_a_bulk_snapshot_reaches_readers_history_and_counters_whole() -> None:
    store = make_store(history=100, reader_queue=50_000)
    sub = store.subscribe()
    names = [b"f%06d" % i for i in range(20_000)]  # big enough for the bulk path
    published = snapshot(store, "n", names)
    assert len(published) == len(names)
    got = [sub.queue.get_nowait() for _ in names]
    assert [ev.entry.raw_name for ev in got if ev is not None] == names
    assert sub.queue.empty()
    assert sample(store, "filewatch_changes_applied_total", {"op": "add"}) == len(names)
    assert sample(store, "filewatch_files") == len(names)
    version = store.index.version
    backlog = store.history_since(version - 100)
    assert backlog is not None
    assert [ev.version for ev in backlog] == list(range(version - 99, version + 1))
    assert store.history_since(version - 101) is None  # beyond what history keeps


async def test_events_queued_during_the_list_skip_the_keys_it_had_not_read_yet() -> None:
    """Each publish is queued with the list's cursor of that moment.

    Keys after that cursor were read by the list later, so the list shows them
    already: their events are skipped. Keys up to it were listed before the
    change: their events are delivered, in version order.
    """
    store = make_store()
    snapshot(store, "n", [b"b", b"d", b"f"])
    sub = store.subscribe()
    sub.cursor = b""  # the list has read nothing yet
    add(store, "n", 1, b"e")  # skipped: the list will read "e"
    sub.cursor = b"d\x00n"  # the list has read up to "d"
    first = add(store, "n", 2, b"a", b"c", b"g")  # a, c: behind the cursor; g: ahead
    sub.cursor = None  # the list is over: everything is delivered
    last = add(store, "n", 3, b"h")
    assert sub.queue.qsize() == 5
    got = await asyncio.wait_for(read(sub, 3), WAIT)
    assert got == [first[0], first[1], last[0]]
    assert sub.queue.empty()
    assert sub.queue.qsize() == 0


async def test_a_long_run_of_skipped_events_does_not_hold_the_loop() -> None:
    """Skipping is done in steps: a big snapshot landing ahead of the cursor yields meanwhile."""
    store = make_store(reader_queue=100_000)
    sub = store.subscribe()
    sub.cursor = b""
    snapshot(store, "n", [b"f%06d" % i for i in range(25_000)])  # all ahead: skipped
    sub.cursor = None
    events = add(store, "n", 1, b"z")
    steps = 0

    async def count_steps() -> None:
        nonlocal steps
        while True:
            steps += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_steps())
    assert await asyncio.wait_for(read(sub, 1), WAIT) == list(events)
    counter.cancel()
    assert steps >= 2  # the loop ran other tasks while 25,000 events were skipped
