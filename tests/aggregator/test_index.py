"""Unit tests of the protocol-neutral index core."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.errors import LimitExceededError, UnknownWatcherError
from aggregator.index import (
    NO_META,
    BatchStatus,
    Change,
    Entry,
    Event,
    EventKind,
    Index,
    Meta,
    Op,
    WatcherInfo,
    count_kinds,
    pack_meta,
    unpack_meta,
)
from aggregator.names import display_name, raw_name

ADDED, REMOVED, MODIFIED = EventKind.ADDED, EventKind.REMOVED, EventKind.MODIFIED

EMOJI = "😀 party.txt".encode()
E_ACUTE = "é.txt".encode()
NON_UTF8 = b"\xff\xfe.txt"
LONG = b"x" * 255


def m(size: int, mtime_ns: int = 1_700_000_000_000_000_000) -> Meta:
    return pack_meta(size, mtime_ns)


def install(
    index: Index,
    node: str,
    files: Mapping[bytes, Meta],
    *,
    epoch: str = "e1",
    sequence: int = 0,
    chunk: int = 2,
) -> tuple[Event, ...]:
    """Send `files` as a snapshot in chunks of `chunk` entries and commit it."""
    index.begin_snapshot(node, epoch)
    items = list(files.items())
    for start in range(0, len(items), chunk):
        index.extend_snapshot(node, items[start : start + chunk])
    return tuple(index.commit_snapshot(node, sequence))


def keys(index: Index) -> list[tuple[str, str]]:
    return [(e.filename, e.node) for e in index.entries()]


def kinds(events: Iterable[Event]) -> list[tuple[EventKind, bytes]]:
    """What happened to which name, in the order it happened."""
    return [(ev.kind, ev.entry.raw_name) for ev in events]


def unordered(pairs: Iterable[tuple[EventKind, bytes]]) -> list[tuple[EventKind, bytes]]:
    return sorted(pairs, key=lambda pair: (pair[0].value, pair[1]))


def assert_versions(before: int, events: Sequence[Event], index: Index) -> None:
    """One version per event, consecutive, ending at the index's version."""
    assert [ev.version for ev in events] == list(range(before + 1, before + 1 + len(events)))
    assert index.version == before + len(events)


# ---------------------------------------------------------------- snapshots

A, B, C = b"a.txt", b"b.txt", b"c.txt"


@pytest.mark.parametrize(
    ("old", "new", "expected_events"),
    [
        pytest.param({}, {A: m(1)}, [(ADDED, A)], id="first-snapshot-adds"),
        pytest.param(
            {A: m(1), B: m(2)},
            {B: m(2), C: m(3)},
            [(ADDED, C), (REMOVED, A)],
            id="absent-entries-removed",
        ),
        pytest.param({A: m(1)}, {A: m(5)}, [(MODIFIED, A)], id="changed-meta-modified"),
        pytest.param({A: m(1)}, {A: m(1, 7)}, [(MODIFIED, A)], id="changed-mtime-modified"),
        pytest.param(
            {A: m(1), B: m(2)}, {}, [(REMOVED, A), (REMOVED, B)], id="empty-snapshot-clears"
        ),
        pytest.param({A: m(1), B: m(2)}, {A: m(1), B: m(2)}, [], id="identical-is-no-op"),
    ],
)
def test_snapshot_replaces_the_watchers_list(
    old: dict[bytes, Meta],
    new: dict[bytes, Meta],
    expected_events: list[tuple[EventKind, bytes]],
) -> None:
    index = Index()
    install(index, "n1", {b"other": m(9)}, epoch="x")  # another watcher stays untouched
    install(index, "n", old, sequence=3)
    before = index.version
    events = install(index, "n", new, sequence=7)
    assert unordered(kinds(events)) == unordered(expected_events)
    assert_versions(before, events, index)
    assert index.files_of("n") == new
    assert index.files_of("n1") == {b"other": m(9)}
    info = index.watcher("n")
    assert info is not None
    assert (info.applied_sequence, info.synced, info.file_count) == (7, True, len(new))


def test_snapshot_chunks_accumulate_and_a_repeated_name_keeps_the_last() -> None:
    index = Index()
    index.begin_snapshot("n", "e")
    index.extend_snapshot("n", [(A, m(1)), (B, m(2))])
    index.extend_snapshot("n", [])
    index.extend_snapshot("n", [(C, m(3)), (A, m(4))])
    events = index.commit_snapshot("n", 0)
    assert index.files_of("n") == {A: m(4), B: m(2), C: m(3)}
    assert len(events) == 3
    assert len(index) == 3


def test_old_list_stays_visible_until_commit() -> None:
    index = Index()
    install(index, "n", {A: m(1), B: m(2)}, sequence=4)
    version = index.version
    index.begin_snapshot("n", "e1")
    index.extend_snapshot("n", [(C, m(3))])
    assert list(index.filenames()) == ["a.txt", "b.txt"]
    assert index.files_of("n") == {A: m(1), B: m(2)}
    assert index.version == version
    index.commit_snapshot("n", 5)
    assert list(index.filenames()) == ["c.txt"]


def test_new_epoch_resets_position_but_keeps_old_files_until_commit() -> None:
    index = Index()
    install(index, "n", {A: m(1), B: m(2)}, epoch="old", sequence=5)
    index.begin_snapshot("n", "new")
    info = index.watcher("n")
    assert info is not None
    assert (info.epoch, info.applied_sequence, info.synced) == ("new", 0, False)
    assert list(index.filenames()) == ["a.txt", "b.txt"]  # no gap for readers
    # The old epoch is over; the new one is not synced until its snapshot lands.
    with pytest.raises(UnknownWatcherError):
        index.apply_batch("n", "old", 6, [Change(Op.ADD, C, m(3))])
    gap = index.apply_batch("n", "new", 1, [Change(Op.ADD, C, m(3))])
    assert (gap.status, gap.events, gap.applied_sequence) == (BatchStatus.GAP, (), 0)
    index.extend_snapshot("n", [(B, m(2)), (C, m(3))])
    events = index.commit_snapshot("n", 0)
    assert unordered(kinds(events)) == [(ADDED, C), (REMOVED, A)]  # B unchanged: no duplicate entry
    assert keys(index) == [("b.txt", "n"), ("c.txt", "n")]
    result = index.apply_batch("n", "new", 1, [Change(Op.REMOVE, B)])
    assert result.status is BatchStatus.APPLIED
    assert list(index.filenames()) == ["c.txt"]


def test_same_epoch_resnapshot_keeps_position_until_commit() -> None:
    index = Index()
    install(index, "n", {A: m(1)}, epoch="e", sequence=5)
    index.begin_snapshot("n", "e")
    info = index.watcher("n")
    assert info is not None
    assert (info.applied_sequence, info.synced) == (5, True)
    index.extend_snapshot("n", [(A, m(1))])
    index.commit_snapshot("n", 9)
    info = index.watcher("n")
    assert info is not None
    assert info.applied_sequence == 9


def test_abort_snapshot_drops_the_pending_list() -> None:
    index = Index()
    install(index, "n", {A: m(1)})
    index.begin_snapshot("n", "e1")
    index.extend_snapshot("n", [(B, m(2))])
    index.abort_snapshot("n")
    index.abort_snapshot("nobody")  # no-op
    assert index.files_of("n") == {A: m(1)}
    with pytest.raises(UnknownWatcherError):
        index.commit_snapshot("n", 1)
    with pytest.raises(UnknownWatcherError):
        index.extend_snapshot("n", [(B, m(2))])


def test_snapshot_calls_for_unknown_watchers_raise() -> None:
    index = Index()
    with pytest.raises(UnknownWatcherError):
        index.extend_snapshot("ghost", [(A, m(1))])
    with pytest.raises(UnknownWatcherError):
        index.commit_snapshot("ghost", 0)
    with pytest.raises(UnknownWatcherError):
        index.apply_batch("ghost", "e", 1, [])
    assert index.watcher("ghost") is None
    assert index.watcher_count == 0


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize(
    ("sequence", "status", "applied_after"),
    [
        pytest.param(0, BatchStatus.DUPLICATE, 3, id="zero-duplicate"),
        pytest.param(1, BatchStatus.DUPLICATE, 3, id="old-duplicate"),
        pytest.param(3, BatchStatus.DUPLICATE, 3, id="current-duplicate"),
        pytest.param(4, BatchStatus.APPLIED, 4, id="next-applied"),
        pytest.param(5, BatchStatus.GAP, 3, id="one-missing-gap"),
        pytest.param(1000, BatchStatus.GAP, 3, id="far-gap"),
    ],
)
def test_apply_batch_status_by_sequence(
    sequence: int, status: BatchStatus, applied_after: int
) -> None:
    index = Index()
    install(index, "n", {A: m(1)}, sequence=3)
    version = index.version
    result = index.apply_batch("n", "e1", sequence, [Change(Op.ADD, B, m(2))])
    assert result.status is status
    assert result.applied_sequence == applied_after
    info = index.watcher("n")
    assert info is not None
    assert info.applied_sequence == applied_after
    if status is BatchStatus.APPLIED:
        assert kinds(result.events) == [(ADDED, B)]
        assert index.files_of("n") == {A: m(1), B: m(2)}
    else:
        assert result.events == ()
        assert index.version == version
        assert index.files_of("n") == {A: m(1)}


@pytest.mark.parametrize("sequence", [0, 1, 2])
def test_batch_before_first_snapshot_is_a_gap(sequence: int) -> None:
    index = Index()
    index.begin_snapshot("n", "e")
    result = index.apply_batch("n", "e", sequence, [Change(Op.ADD, A, m(1))])
    assert (result.status, result.events, result.applied_sequence) == (BatchStatus.GAP, (), 0)
    assert len(index) == 0
    assert index.version == 0


INITIAL = {A: m(1), B: m(2)}


@pytest.mark.parametrize(
    ("changes", "expected_files", "expected_events"),
    [
        pytest.param([], INITIAL, [], id="empty-batch"),
        pytest.param([Change(Op.ADD, A, m(1))], INITIAL, [], id="add-present-same-meta"),
        pytest.param([Change(Op.REMOVE, C)], INITIAL, [], id="remove-absent"),
        pytest.param(
            [Change(Op.REMOVE, C), Change(Op.ADD, B, m(2)), Change(Op.REMOVE, C)],
            INITIAL,
            [],
            id="only-idempotent-noise",
        ),
        pytest.param(
            [Change(Op.MODIFY, A, m(10))],
            {A: m(10), B: m(2)},
            [(MODIFIED, A)],
            id="modify-updates-size",
        ),
        pytest.param(
            [Change(Op.ADD, A, m(11))],
            {A: m(11), B: m(2)},
            [(MODIFIED, A)],
            id="add-present-new-meta-upserts",
        ),
        pytest.param(
            [Change(Op.MODIFY, C, m(3))],
            {**INITIAL, C: m(3)},
            [(ADDED, C)],
            id="modify-absent-upserts",
        ),
        pytest.param([Change(Op.ADD, C, m(3))], {**INITIAL, C: m(3)}, [(ADDED, C)], id="add-new"),
        pytest.param([Change(Op.REMOVE, A)], {B: m(2)}, [(REMOVED, A)], id="remove-present"),
        pytest.param(
            [Change(Op.ADD, C, m(3)), Change(Op.REMOVE, C)],
            INITIAL,
            [(ADDED, C), (REMOVED, C)],
            id="add-then-remove",
        ),
        pytest.param(
            [Change(Op.REMOVE, A), Change(Op.ADD, b"renamed.txt", m(1))],
            {b"renamed.txt": m(1), B: m(2)},
            [(REMOVED, A), (ADDED, b"renamed.txt")],
            id="rename",
        ),
        pytest.param(
            [Change(Op.REMOVE, A), Change(Op.ADD, A, m(1))],
            INITIAL,
            [(REMOVED, A), (ADDED, A)],
            id="remove-then-readd",
        ),
    ],
)
def test_apply_batch_changes(
    changes: list[Change],
    expected_files: dict[bytes, Meta],
    expected_events: list[tuple[EventKind, bytes]],
) -> None:
    index = Index()
    install(index, "n", INITIAL, sequence=1)
    install(index, "peer", {A: m(100)}, epoch="p")
    before = index.version
    result = index.apply_batch("n", "e1", 2, changes)
    assert result.status is BatchStatus.APPLIED
    assert result.applied_sequence == 2  # the position advances even for a no-op batch
    assert kinds(result.events) == expected_events  # in the order of the changes
    assert_versions(before, result.events, index)
    assert index.files_of("n") == expected_files
    assert index.files_of("peer") == {A: m(100)}
    assert len(index) == len(expected_files) + 1
    for ev in result.events:
        assert ev.entry.node == "n"
        assert ev.entry.filename == display_name(ev.entry.raw_name)


def test_events_carry_the_entry_as_readers_see_it() -> None:
    index = Index()
    install(index, "n", {A: m(1, 11)})
    result = index.apply_batch("n", "e1", 1, [Change(Op.MODIFY, A, m(42, 99))])
    assert [(ev.kind, ev.entry, ev.version) for ev in result.events] == [
        (MODIFIED, Entry("a.txt", "n", A, 42, 99), index.version)
    ]
    result = index.apply_batch("n", "e1", 2, [Change(Op.REMOVE, A)])
    # A removal reports the entry's last known metadata.
    assert [(ev.kind, ev.entry, ev.version) for ev in result.events] == [
        (REMOVED, Entry("a.txt", "n", A, 42, 99), index.version)
    ]


def test_version_bumped_once_per_applied_event() -> None:
    index = Index()
    assert index.version == 0
    steps: list[tuple[str, int]] = []
    install(index, "n", {A: m(1), B: m(2), C: m(3)}, sequence=1)
    steps.append(("snapshot of 3", index.version))
    install(index, "n", {A: m(1), B: m(2), C: m(3)}, sequence=1)
    steps.append(("identical snapshot", index.version))
    index.apply_batch(
        "n",
        "e1",
        2,
        [Change(Op.MODIFY, A, m(9)), Change(Op.REMOVE, b"zz"), Change(Op.ADD, B, m(2))],
    )
    steps.append(("one real change", index.version))
    index.apply_batch("n", "e1", 2, [Change(Op.REMOVE, A)])
    steps.append(("duplicate", index.version))
    index.apply_batch("n", "e1", 9, [Change(Op.REMOVE, A)])
    steps.append(("gap", index.version))
    index.remove_watcher("n")
    steps.append(("remove watcher of 3", index.version))
    index.remove_watcher("n")
    steps.append(("remove again", index.version))
    assert steps == [
        ("snapshot of 3", 3),
        ("identical snapshot", 3),
        ("one real change", 4),
        ("duplicate", 4),
        ("gap", 4),
        ("remove watcher of 3", 7),
        ("remove again", 7),
    ]


# ---------------------------------------------------------------- watchers


def test_remove_watcher_removes_only_its_files() -> None:
    index = Index()
    install(index, "n1", {A: m(1), B: m(2)})
    install(index, "n2", {A: m(3)})
    before = index.version
    events = index.remove_watcher("n1")
    assert unordered(kinds(events)) == [(REMOVED, A), (REMOVED, B)]
    assert all(ev.entry.node == "n1" for ev in events)
    assert_versions(before, events, index)
    assert keys(index) == [("a.txt", "n2")]
    assert index.watcher("n1") is None
    assert index.files_of("n1") == {}
    assert index.watcher_count == 1
    assert [w.node for w in index.watchers()] == ["n2"]
    assert index.remove_watcher("n1") == ()
    assert index.remove_watcher("never") == ()


def test_remove_watcher_with_a_snapshot_in_progress_forgets_it() -> None:
    index = Index()
    install(index, "n", {A: m(1)})
    index.begin_snapshot("n", "e2")
    index.extend_snapshot("n", [(B, m(1))])
    assert len(index.remove_watcher("n")) == 1
    with pytest.raises(UnknownWatcherError):
        index.commit_snapshot("n", 0)
    assert len(index) == 0


# ---------------------------------------------------------------- sorting and paging

SORT_FILES: dict[str, dict[bytes, Meta]] = {
    "n2": {b"apple": m(1), NON_UTF8: m(2), EMOJI: m(3)},
    "n1": {
        EMOJI: m(1),
        NON_UTF8: m(2),
        E_ACUTE: m(3),
        b"apple pie": m(4),
        b"apple": m(5),
        b"Zebra": m(6),
        b".hidden": m(7),
        b" leading space": m(8),
        LONG: m(9),
    },
    "n10": {b"apple": m(1)},
}

# Code point order of the display names: ' ' < '.' < 'Z' < 'a' < 'x' < 'é' (U+E9)
# < U+DCFF (the escaped byte 0xff) < U+1F600; ties by node name, also in code point
# order ("n10" < "n2"). A byte-wise sort would put 0xff after the emoji's 0xf0.
SORTED_KEYS = [
    (" leading space", "n1"),
    (".hidden", "n1"),
    ("Zebra", "n1"),
    ("apple", "n1"),
    ("apple", "n10"),
    ("apple", "n2"),
    ("apple pie", "n1"),
    ("x" * 255, "n1"),
    ("é.txt", "n1"),
    ("\udcff\udcfe.txt", "n1"),
    ("\udcff\udcfe.txt", "n2"),
    ("😀 party.txt", "n1"),
    ("😀 party.txt", "n2"),
]


@pytest.fixture
def sorted_index() -> Index:
    index = Index()
    for node, files in SORT_FILES.items():
        install(index, node, files, epoch=f"epoch-{node}", chunk=3)
    return index


def test_entries_sorted_by_code_point_then_node(sorted_index: Index) -> None:
    assert keys(sorted_index) == SORTED_KEYS
    assert list(sorted_index.filenames()) == [name for name, _ in SORTED_KEYS]
    assert len(sorted_index) == len(SORTED_KEYS)


def test_a_meta_of_the_epoch_is_known_and_no_meta_is_unknown() -> None:
    assert unpack_meta(pack_meta(5, 0)) == (5, 0)  # 1970-01-01T00:00:00Z is a time
    assert unpack_meta(pack_meta(0, -1)) == (0, -1)  # and so is the ns before it
    assert unpack_meta(NO_META) == (None, None)
    index = Index()
    index.begin_snapshot("n", "e")
    index.extend_snapshot("n", [(b"legacy.txt", NO_META), (b"epoch.txt", pack_meta(5, 0))])
    index.commit_snapshot("n", 0)
    assert [(e.filename, e.size, e.mtime_ns) for e in index.entries()] == [
        ("epoch.txt", 5, 0),
        ("legacy.txt", None, None),
    ]


def meta_of(entry: Entry) -> Meta:
    """The packed meta of an entry as read back (NO_META when size and time are unknown)."""
    if entry.size is None or entry.mtime_ns is None:
        return NO_META
    return pack_meta(entry.size, entry.mtime_ns)


def test_display_names_are_lossless(sorted_index: Index) -> None:
    for entry in sorted_index.entries():
        assert raw_name(entry.filename) == entry.raw_name
        assert SORT_FILES[entry.node][entry.raw_name] == meta_of(entry)
    odd = [e for e in sorted_index.entries() if e.raw_name == NON_UTF8]
    assert [e.filename for e in odd] == ["\udcff\udcfe.txt"] * 2


names_strategy = st.binary(min_size=1, max_size=12).filter(lambda b: b"\x00" not in b)


@settings(max_examples=300, deadline=None)
@given(
    files=st.lists(
        st.tuples(names_strategy, st.sampled_from(["n", "n1", "n10", "é", "n\udcff"])),
        max_size=40,
    )
)
def test_order_is_display_name_then_node_for_any_bytes(files: list[tuple[bytes, str]]) -> None:
    index = Index()
    by_node: dict[str, dict[bytes, Meta]] = {}
    for name, node in files:
        by_node.setdefault(node, {})[name] = m(len(name))
    for node, names in by_node.items():
        install(index, node, names, epoch=node, chunk=7)
    expected = sorted({(display_name(name), node) for name, node in files})
    assert keys(index) == expected
    assert [(e.raw_name, e.size) for e in index.entries()] == [
        (raw_name(name), len(raw_name(name))) for name, _ in expected
    ]


@pytest.mark.parametrize(
    ("size", "mtime_ns"),
    [(0, 0), (1, -1), (2**63, -(2**63)), (12345, 2**63 - 1), (7, 1_700_000_000_123_456_789)],
)
def test_meta_packs_any_size_and_int64_mtime(size: int, mtime_ns: int) -> None:
    assert unpack_meta(pack_meta(size, mtime_ns)) == (size, mtime_ns)
    index = Index()
    install(index, "n", {A: pack_meta(size, mtime_ns)})
    assert [(e.size, e.mtime_ns) for e in index.entries()] == [(size, mtime_ns)]


def test_non_utf8_and_its_replacement_form_are_distinct_entries() -> None:
    # The Go watcher sends U+FFFD for bad bytes; that name must not collide with
    # the exact bytes a Python watcher sends.
    index = Index()
    install(index, "n", {NON_UTF8: m(1), "\ufffd\ufffd.txt".encode(): m(2)})
    assert [e.filename for e in index.entries()] == ["\udcff\udcfe.txt", "\ufffd\ufffd.txt"]


def test_an_update_does_not_reorder_or_duplicate(sorted_index: Index) -> None:
    result = sorted_index.apply_batch("n1", "epoch-n1", 1, [Change(Op.MODIFY, b"apple", m(50))])
    assert result.status is BatchStatus.APPLIED
    assert keys(sorted_index) == SORTED_KEYS
    apple = [e for e in sorted_index.entries() if e.filename == "apple" and e.node == "n1"]
    assert [e.size for e in apple] == [50]


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 13, 100])
def test_page_after_walks_every_entry_once(sorted_index: Index, limit: int) -> None:
    walked: list[Entry] = []
    after: tuple[bytes, str] | None = None
    while True:
        page = sorted_index.page_after(after, limit)
        assert len(page) <= limit
        if not page:
            break
        walked.extend(page)
        assert sorted_index.has_after(page[-1]) == (len(walked) < len(SORTED_KEYS))
        after = (page[-1].raw_name, page[-1].node)
    assert walked == list(sorted_index.entries())


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        pytest.param(None, SORTED_KEYS[:2], id="from-start"),
        pytest.param((b"apple", "n1"), SORTED_KEYS[4:6], id="tie-continues-with-next-node"),
        pytest.param((b"apple", "n0"), SORTED_KEYS[3:5], id="absent-key-between-ties"),
        pytest.param((NON_UTF8, "n2"), SORTED_KEYS[11:13], id="after-surrogate-escape"),
        pytest.param((b"b", "zz"), SORTED_KEYS[7:9], id="absent-name"),
        pytest.param((EMOJI, "n2"), [], id="after-last"),
    ],
)
def test_page_after_positions(
    sorted_index: Index, after: tuple[bytes, str] | None, expected: list[tuple[str, str]]
) -> None:
    page = sorted_index.page_after(after, 2)
    assert [(e.filename, e.node) for e in page] == expected


def test_page_after_an_entry_removed_meanwhile(sorted_index: Index) -> None:
    page = sorted_index.page_after(None, 4)
    last = page[-1]
    assert (last.filename, last.node) == ("apple", "n1")
    sorted_index.apply_batch("n1", "epoch-n1", 1, [Change(Op.REMOVE, b"apple")])
    nxt = sorted_index.page_after((last.raw_name, last.node), 2)
    assert [(e.filename, e.node) for e in nxt] == [("apple", "n10"), ("apple", "n2")]
    assert sorted_index.has_after(last)


def test_page_after_limit_zero_and_empty_index(sorted_index: Index) -> None:
    assert sorted_index.page_after(None, 0) == ()
    empty = Index()
    assert empty.page_after(None, 10) == ()
    assert not empty.has_after(Entry("a", "n", b"a", 0, 0))
    last = list(sorted_index.entries())[-1]
    assert not sorted_index.has_after(last)
    assert sorted_index.has_after(Entry("", "", b"", 0, 0))


# ---------------------------------------------------------------- limits


def test_snapshot_over_the_limit_is_refused_and_changes_nothing() -> None:
    index = Index(max_files_per_watcher=3)
    install(index, "n", {A: m(1), B: m(2)}, sequence=4)
    version = index.version
    index.begin_snapshot("n", "e1")
    index.extend_snapshot("n", [(b"1", m(1)), (b"2", m(1))])
    with pytest.raises(LimitExceededError):
        index.extend_snapshot("n", [(b"3", m(1)), (b"4", m(1))])
    assert index.files_of("n") == {A: m(1), B: m(2)}
    assert index.version == version
    info = index.watcher("n")
    assert info is not None
    assert (info.applied_sequence, info.synced) == (4, True)
    with pytest.raises(UnknownWatcherError):  # the refused snapshot is gone
        index.commit_snapshot("n", 5)
    # Exactly at the limit is fine, and repeated names count once.
    install(index, "n", {b"1": m(1), b"2": m(1), b"3": m(1)})
    index.begin_snapshot("n", "e1")
    index.extend_snapshot("n", [(b"1", m(1)), (b"1", m(2)), (b"2", m(1)), (b"3", m(1))])
    index.commit_snapshot("n", 0)
    assert len(index) == 3


def test_batch_over_the_limit_is_refused_whole() -> None:
    index = Index(max_files_per_watcher=3)
    install(index, "n", {A: m(1), B: m(2)}, sequence=1)
    version = index.version
    with pytest.raises(LimitExceededError):
        index.apply_batch(
            "n",
            "e1",
            2,
            [Change(Op.MODIFY, A, m(5)), Change(Op.ADD, C, m(3)), Change(Op.ADD, b"d", m(4))],
        )
    assert index.files_of("n") == {A: m(1), B: m(2)}
    assert index.version == version
    info = index.watcher("n")
    assert info is not None
    assert info.applied_sequence == 1
    # The same sequence can still be applied within the limit.
    ok = index.apply_batch("n", "e1", 2, [Change(Op.ADD, C, m(3)), Change(Op.ADD, A, m(1))])
    assert ok.status is BatchStatus.APPLIED
    assert len(index) == 3
    # At the limit, changes to present names still apply.
    ok = index.apply_batch("n", "e1", 3, [Change(Op.MODIFY, A, m(7)), Change(Op.REMOVE, B)])
    assert ok.status is BatchStatus.APPLIED
    assert index.files_of("n") == {A: m(7), C: m(3)}


def test_limit_is_per_watcher() -> None:
    index = Index(max_files_per_watcher=2)
    install(index, "n1", {A: m(1), B: m(1)})
    install(index, "n2", {A: m(1), B: m(1)})
    assert len(index) == 4


def test_rename_at_the_limit_is_accepted() -> None:
    index = Index(max_files_per_watcher=2)
    install(index, "n", {A: m(1), B: m(1)}, sequence=1)
    result = index.apply_batch("n", "e1", 2, [Change(Op.REMOVE, A), Change(Op.ADD, C, m(1))])
    assert result.status is BatchStatus.APPLIED
    assert index.files_of("n") == {B: m(1), C: m(1)}


# ---------------------------------------------------------------- property: convergence

NAME_POOL = (A, b"B.txt", b".hidden", b"with space.txt", EMOJI, E_ACUTE, NON_UTF8, LONG)
PEER_FILES = {A: m(100), NON_UTF8: m(101), b"peer-only": m(102)}
NODE = "w"

Msg = tuple[str, int, tuple[Change, ...]]  # (epoch, sequence, changes)


@dataclass
class SimWatcher:
    """A watcher whose batches travel over an unreliable network to an Index."""

    index: Index
    model: dict[bytes, Meta]
    epoch_no: int = 0
    sequence: int = 0
    pending: list[Change] = field(default_factory=list)
    sent: dict[int, tuple[Change, ...]] = field(default_factory=dict)
    # The folder as of (epoch, sequence): what the index must hold at that position.
    state_at: dict[tuple[str, int], dict[bytes, Meta]] = field(default_factory=dict)
    inflight: list[Msg] = field(default_factory=list)
    resyncs: int = 0

    @property
    def epoch(self) -> str:
        return f"epoch-{self.epoch_no}"

    # -- the folder changes
    def set_file(self, name: bytes, size: int) -> None:
        new = m(size, size * 1000)
        old = self.model.get(name)
        self.model[name] = new
        # ADD of a present name with the same meta is the Go watcher's noise.
        op = Op.ADD if old is None or old == new else Op.MODIFY
        self.pending.append(Change(op, name, new))

    def delete_file(self, name: bytes) -> None:
        self.model.pop(name, None)  # a remove of an absent name is noise too
        self.pending.append(Change(Op.REMOVE, name))

    # -- the watcher sends
    def flush(self) -> None:
        if not self.pending:
            return
        self.sequence += 1
        changes = tuple(self.pending)
        self.pending.clear()
        self.sent[self.sequence] = changes
        self.state_at[(self.epoch, self.sequence)] = dict(self.model)
        self.inflight.append((self.epoch, self.sequence, changes))

    def snapshot(self) -> None:
        """A full resend of the folder at the current sequence (pending included)."""
        self.pending.clear()
        self.state_at[(self.epoch, self.sequence)] = dict(self.model)
        before = self.index.version
        events = install(
            self.index, NODE, self.model, epoch=self.epoch, sequence=self.sequence, chunk=3
        )
        assert_versions(before, events, self.index)
        assert self.index.files_of(NODE) == self.model
        self.resyncs += 1

    def restart(self) -> None:
        """A new process: new epoch, sequence from 0, and a snapshot on connect."""
        self.epoch_no += 1
        self.sequence = 0
        self.pending.clear()
        self.sent.clear()
        self.snapshot()

    # -- the aggregator receives
    def deliver(self, msg: Msg) -> None:
        epoch, sequence, changes = msg
        before_version = self.index.version
        before_files = dict(self.index.files_of(NODE))
        info = self.index.watcher(NODE)
        assert info is not None
        applied = info.applied_sequence
        try:
            result = self.index.apply_batch(NODE, epoch, sequence, changes)
        except UnknownWatcherError:
            assert epoch != self.epoch  # only a batch of a previous process
            assert self.index.version == before_version
            return
        assert epoch == self.epoch
        assert_versions(before_version, result.events, self.index)
        if result.status is BatchStatus.APPLIED:
            assert sequence == applied + 1
            assert self.index.files_of(NODE) == self.state_at[(epoch, sequence)]
            return
        assert result.events == ()
        assert self.index.files_of(NODE) == before_files
        if result.status is BatchStatus.DUPLICATE:
            assert sequence <= applied
        else:
            assert sequence > applied + 1
            self.snapshot()  # the protocol's answer to a gap: resync

    def check_global(self) -> None:
        ks = keys(self.index)
        assert ks == sorted(ks)
        assert len(set(ks)) == len(ks)
        assert self.index.files_of("peer") == PEER_FILES
        assert len(self.index) == len(PEER_FILES) + len(self.index.files_of(NODE))


STEP_KINDS = (
    "set",
    "set",
    "set",
    "delete",
    "delete",
    "flush",
    "flush",
    "deliver",
    "deliver",
    "deliver",
    "redeliver",
    "drop",
    "resync",
    "restart",
)
steps_strategy = st.lists(
    st.tuples(st.sampled_from(STEP_KINDS), st.integers(0, 255), st.integers(0, 3)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    initial=st.dictionaries(
        st.sampled_from(NAME_POOL), st.builds(m, st.integers(0, 3)), max_size=len(NAME_POOL)
    ),
    steps=steps_strategy,
    final_snapshot=st.booleans(),
)
def test_index_converges_to_the_folder_despite_an_unreliable_network(
    initial: dict[bytes, Meta], steps: list[tuple[str, int, int]], final_snapshot: bool
) -> None:
    index = Index()
    install(index, "peer", PEER_FILES, epoch="peer")
    sim = SimWatcher(index=index, model=dict(initial))
    sim.snapshot()  # the first connection
    for kind, a, b in steps:
        name = NAME_POOL[a % len(NAME_POOL)]
        if kind == "set":
            sim.set_file(name, b)
        elif kind == "delete":
            sim.delete_file(name)
        elif kind == "flush":
            sim.flush()
        elif kind == "resync":
            sim.snapshot()
        elif kind == "restart":
            sim.restart()
        elif sim.inflight:
            i = a % len(sim.inflight)
            if kind == "redeliver":  # duplicated: a copy stays in flight
                sim.deliver(sim.inflight[i])
            elif kind == "deliver":  # reordered: any message in flight may go next
                sim.deliver(sim.inflight.pop(i))
            else:  # lost
                sim.inflight.pop(i)
        sim.check_global()

    sim.flush()
    if final_snapshot:
        sim.snapshot()
    else:  # a resume: the watcher resends, in order, what the aggregator lacks
        info = index.watcher(NODE)
        assert info is not None
        assert info.epoch == sim.epoch
        for sequence in range(info.applied_sequence + 1, sim.sequence + 1):
            result = index.apply_batch(NODE, sim.epoch, sequence, sim.sent[sequence])
            assert result.status is BatchStatus.APPLIED
    assert index.files_of(NODE) == sim.model
    mine = [e for e in index.entries() if e.node == NODE]
    assert [(e.raw_name, meta_of(e)) for e in mine] == sorted(
        sim.model.items(), key=lambda item: display_name(item[0])
    )
    sim.check_global()


# ---------------------------------------------------------------- bulk snapshots

BULK = 25_000  # beyond the size where a snapshot is merged in bulk


def bulk_files(prefix: bytes, count: int) -> dict[bytes, Meta]:
    # Descending, so that the bulk path must sort.
    return {b"%s%06d" % (prefix, i): m(i) for i in reversed(range(count))}


@pytest.mark.parametrize("others", [0, 3])
def test_bulk_snapshot_merges_in_order_and_reports_each_add(others: int) -> None:
    index = Index()
    install(index, "other", {b"f%06d-x" % (i * 9000): m(0) for i in range(others)})
    before = index.version
    files = bulk_files(b"f", BULK)
    index.begin_snapshot("n", "e1")
    index.extend_snapshot("n", files.items())
    events = index.commit_snapshot("n", 4)
    assert len(events) == BULK
    assert count_kinds(events) == {ADDED: BULK}
    assert_versions(before, list(events), index)
    assert events[0].entry == Entry("f000000", "n", b"f000000", 0, 1_700_000_000_000_000_000)
    assert events[-1].entry.raw_name == b"f%06d" % (BULK - 1)
    assert [ev.version for ev in events[-3:]] == [
        index.version - 2,
        index.version - 1,
        index.version,
    ]
    with pytest.raises(IndexError):
        events[BULK]
    assert keys(index) == sorted(
        [(name.decode(), "n") for name in files]
        + [(f"f{i * 9000:06d}-x", "other") for i in range(others)]
    )
    assert index.files_of("n") == files
    assert index.watcher("n") == WatcherInfo("n", "e1", 4, BULK, True)


def test_bulk_resnapshot_removes_what_went_then_adds_the_rest() -> None:
    index = Index()
    install(index, "n", {b"old-1": m(1), b"keep": m(2)})
    files = bulk_files(b"new-", BULK) | {b"keep": m(3)}
    before = index.version
    index.begin_snapshot("n", "e1")
    index.extend_snapshot("n", files.items())
    events = index.commit_snapshot("n", 1)
    assert kinds(events[:2]) == [(REMOVED, b"old-1"), (MODIFIED, b"keep")]
    assert count_kinds(events) == {REMOVED: 1, MODIFIED: 1, ADDED: BULK}
    assert_versions(before, list(events), index)
    assert index.files_of("n") == files
    assert len(index) == BULK + 1
