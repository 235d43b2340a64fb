"""The watcher's folder state: coalescing, sequences, the resend ring, scans, chunks."""

from __future__ import annotations

import pytest

from watcher.scanner import FileStat
from watcher.state import Batch, Change, FolderState, Op, chunked

S1 = FileStat(1, 1_000)
S2 = FileStat(2, 2_000)
S3 = FileStat(3, 3_000)
A, B, C, D, E = b"a", b"b", b"c", b"d", b"e"

Observation = tuple[bytes, FileStat | None]


def settled(files: dict[bytes, FileStat]) -> FolderState:
    """A state that holds `files` and owes nothing (one batch taken: sequence 1)."""
    state = FolderState()
    for name, st in files.items():
        state.observe(name, st, 1)
    if files:
        assert state.take_batch(1000) is not None
    assert state.pending == 0
    return state


def net(batch: Batch | None) -> set[Change]:
    return set() if batch is None else set(batch.changes)


# ---------------------------------------------------------------- coalescing


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        pytest.param([(C, S1), (C, None)], set(), id="add-then-remove-sends-nothing"),
        pytest.param(
            [(C, S1), (C, S2), (C, S3)], {Change(Op.ADD, C, S3)}, id="add-then-modify-one-add"
        ),
        pytest.param([(A, S2), (A, S3)], {Change(Op.MODIFY, A, S3)}, id="modify-twice-latest"),
        pytest.param([(A, None), (A, S1)], set(), id="remove-then-same-back"),
        pytest.param([(A, None), (A, S2)], {Change(Op.MODIFY, A, S2)}, id="remove-then-changed"),
        pytest.param([(A, S2), (A, S1)], set(), id="modify-then-back"),
        pytest.param([(A, S2), (A, None)], {Change(Op.REMOVE, A, None)}, id="modify-then-remove"),
        pytest.param(
            [(A, None), (C, S1)],
            {Change(Op.REMOVE, A, None), Change(Op.ADD, C, S1)},
            id="rename-remove-plus-add",
        ),
        pytest.param(
            [(A, None), (B, S1)],
            {Change(Op.REMOVE, A, None), Change(Op.MODIFY, B, S1)},
            id="rename-over-existing",
        ),
        pytest.param([(A, S1), (D, None)], set(), id="no-op-observations"),
    ],
)
def test_take_batch_sends_the_net_change_per_name(
    observations: list[Observation], expected: set[Change]
) -> None:
    state = settled({A: S1, B: S2})
    for name, st in observations:
        state.observe(name, st, 5)
    batch = state.take_batch(1000)
    assert net(batch) == expected
    if expected:
        assert batch is not None
        assert batch.sequence == 2
        assert len(batch.changes) == len(expected)  # one change per name
    else:
        assert batch is None
    assert state.sequence == (2 if expected else 1)
    assert state.pending == 0
    assert state.take_batch(1000) is None


@pytest.mark.parametrize(
    ("name", "now", "changed"),
    [
        (A, S1, False),  # as it is
        (A, S2, True),
        (A, None, True),
        (D, None, False),  # absent and still absent
        (D, S1, True),
    ],
)
def test_observe_reports_whether_anything_changed(
    name: bytes, now: FileStat | None, changed: bool
) -> None:
    state = settled({A: S1})
    assert state.observe(name, now, 7) is changed
    assert state.pending == (1 if changed else 0)
    expected = {A: S1}
    if now is None:
        expected.pop(name, None)
    else:
        expected[name] = now
    assert state.files == expected


def test_sequence_grows_by_one_per_batch_only() -> None:
    state = FolderState()
    assert state.take_batch(10) is None
    sequences = []
    for i, name in enumerate([A, B, C], start=1):
        state.observe(name, S1, i)
        batch = state.take_batch(10)
        assert batch is not None
        sequences.append(batch.sequence)
        assert state.take_batch(10) is None  # nothing owed: no batch, no sequence
    state.observe(A, S1, 9)  # no change
    assert state.take_batch(10) is None
    assert sequences == [1, 2, 3]
    assert state.sequence == 3


def test_max_changes_splits_into_consecutive_batches() -> None:
    state = FolderState()
    names = [bytes([ord("a") + i]) for i in range(5)]
    for i, name in enumerate(names):
        state.observe(name, S1, 100 + i)
    assert state.pending == 5
    batches = []
    while (batch := state.take_batch(2)) is not None:
        batches.append(batch)
    assert [b.sequence for b in batches] == [1, 2, 3]
    assert [len(b.changes) for b in batches] == [2, 2, 1]
    assert [c.name for b in batches for c in b.changes] == names  # each once, in order
    assert all(c.op is Op.ADD for b in batches for c in b.changes)
    # The lag clock starts at the first unsent observation.
    assert [b.observed_ns for b in batches] == [100, 100, 100]
    state.observe(A, S2, 500)
    batch = state.take_batch(2)
    assert batch is not None
    assert batch.observed_ns == 500


def test_observed_ns_is_the_first_observation_of_the_batch() -> None:
    state = FolderState()
    state.observe(A, S1, 10)
    state.observe(B, S1, 20)
    state.observe(A, S2, 30)
    batch = state.take_batch(10)
    assert batch is not None
    assert batch.observed_ns == 10


def test_take_batch_without_modify_drops_content_changes() -> None:
    # The legacy protocol has no modify op: content changes are not sent at all.
    state = settled({A: S1, B: S1})
    state.observe(A, S2, 2)
    assert state.take_batch(10, modify=False) is None
    assert state.sequence == 1
    assert state.pending == 0
    state.observe(A, S3, 3)
    state.observe(B, None, 3)
    state.observe(C, S1, 3)
    batch = state.take_batch(10, modify=False)
    assert net(batch) == {Change(Op.REMOVE, B, None), Change(Op.ADD, C, S1)}
    assert state.files == {A: S3, C: S1}


def test_baseline_sets_the_starting_point() -> None:
    state = FolderState()
    state.observe(A, S1, 1)
    state.observe(B, S1, 1)
    state.baseline(1)  # the Go watcher's seqno after its initial scan
    assert (state.sequence, state.pending) == (1, 0)
    assert state.take_batch(10) is None
    assert state.files == {A: S1, B: S1}
    state.observe(C, S1, 2)
    batch = state.take_batch(10)
    assert batch is not None
    assert (batch.sequence, batch.changes) == (2, (Change(Op.ADD, C, S1),))


# ---------------------------------------------------------------- snapshot and resume


def test_snapshot_includes_pending_changes_and_clears_them() -> None:
    state = settled({A: S1, B: S1})
    state.observe(C, S2, 3)
    state.observe(A, None, 3)
    files, sequence = state.snapshot()
    assert dict(files) == {B: S1, C: S2}
    assert len(files) == 2
    assert sequence == state.sequence
    assert state.pending == 0
    assert state.take_batch(10) is None
    # Later changes go in the next sequence.
    state.observe(D, S3, 4)
    batch = state.take_batch(10)
    assert batch is not None
    assert (batch.sequence, batch.changes) == (sequence + 1, (Change(Op.ADD, D, S3),))


def test_snapshot_without_pending_changes_keeps_the_sequence() -> None:
    state = settled({A: S1})
    assert state.snapshot() == ([(A, S1)], 1)
    assert state.sequence == 1


def test_snapshot_of_an_empty_folder() -> None:
    assert FolderState().snapshot() == ([], 0)


@pytest.fixture
def five_batches() -> FolderState:
    """Five batches sent (sequences 1-5) with a ring of 3: it holds 3, 4, 5."""
    state = FolderState(resend_buffer=3)
    for i in range(5):
        state.observe(bytes([ord("a") + i]), S1, i)
        assert state.take_batch(10) is not None
    return state


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        pytest.param(5, [], id="up-to-date"),
        pytest.param(4, [5], id="one-behind"),
        pytest.param(2, [3, 4, 5], id="oldest-in-ring"),
        pytest.param(1, None, id="ring-no-longer-reaches"),
        pytest.param(0, None, id="from-scratch"),
        pytest.param(6, None, id="aggregator-ahead"),
    ],
)
def test_batches_after(five_batches: FolderState, after: int, expected: list[int] | None) -> None:
    got = five_batches.batches_after(after)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert [b.sequence for b in got] == expected
        # The resent batches are the ones sent, unchanged.
        assert [c.name for b in got for c in b.changes] == [
            bytes([ord("a") + s - 1]) for s in expected
        ]


def test_batches_after_on_a_fresh_state() -> None:
    state = FolderState()
    assert state.batches_after(0) == []
    assert state.batches_after(1) is None


def test_a_resume_after_an_uncommitted_snapshot_still_carries_its_changes() -> None:
    state = settled({A: S1})  # the aggregator has applied sequence 1
    state.observe(B, S2, 2)
    _files, _sequence = state.snapshot()  # sent, but the stream breaks before its end
    resend = state.batches_after(1)  # the aggregator still says: applied 1, resume
    # Either the ring must replay B's addition, or the watcher must refuse to resume.
    assert resend is None or Change(Op.ADD, B, S2) in {c for b in resend for c in b.changes}


# ---------------------------------------------------------------- scans


def test_finish_scan_merges_and_skips_names_touched_during_the_scan() -> None:
    state = settled({A: S1, B: S1, E: S1})
    state.begin_scan()
    # Events during the scan (newer than what the scan may have seen):
    state.observe(C, S2, 10)  # created after the scan passed
    state.observe(B, None, 10)  # deleted after the scan saw it
    scanned = {A: S3, B: S1, D: S1}  # A modified, D missed by events, E gone unnoticed
    changed, touched = state.finish_scan(scanned, 20)
    assert touched == {B, C}
    assert changed == 3  # A modified, D added, E removed
    assert state.files == {A: S3, C: S2, D: S1}
    batch = state.take_batch(100)
    assert net(batch) == {
        Change(Op.MODIFY, A, S3),
        Change(Op.REMOVE, B, None),
        Change(Op.ADD, C, S2),
        Change(Op.ADD, D, S1),
        Change(Op.REMOVE, E, None),
    }


def test_finish_scan_that_matches_changes_nothing() -> None:
    state = settled({A: S1, B: S2})
    state.begin_scan()
    assert state.finish_scan({A: S1, B: S2}, 5) == (0, set())
    assert state.take_batch(10) is None
    assert state.sequence == 1


def test_touched_names_are_only_tracked_during_a_scan() -> None:
    state = settled({A: S1})
    state.observe(B, S1, 1)  # before any scan: not tracked
    state.begin_scan()
    state.observe(A, S1, 2)  # an event that changed nothing still marks the name
    changed, touched = state.finish_scan({B: S1}, 3)
    assert touched == {A}
    assert changed == 0
    assert A in state.files  # not removed: the event may be newer than the scan
    state.begin_scan()
    assert state.finish_scan({A: S1, B: S1}, 4) == (0, set())


def test_scan_without_begin_tracks_nothing() -> None:
    state = settled({A: S1})
    changed, touched = state.finish_scan({B: S1}, 3)
    assert (changed, touched) == (2, set())
    assert state.files == {B: S1}


# ---------------------------------------------------------------- chunks


def items(*lengths: int) -> list[tuple[bytes, FileStat]]:
    return [(bytes([ord("a") + i % 26]) * n, S1) for i, n in enumerate(lengths)]


@pytest.mark.parametrize(
    ("lengths", "max_bytes", "sizes"),
    [
        pytest.param([], 100, [], id="empty"),
        pytest.param([8] * 7, 100, [3, 3, 1], id="about-100-bytes"),  # 40 bytes per entry
        pytest.param([8] * 6, 120, [3, 3], id="exact-fit"),
        pytest.param([8] * 3, 1, [1, 1, 1], id="tiny-limit-one-per-chunk"),
        pytest.param([8] * 3, 10_000, [3], id="all-in-one"),
        pytest.param([200, 1, 1, 1, 1], 100, [1, 4], id="a-long-name-alone"),
    ],
)
def test_chunked_splits_by_approximate_bytes(
    lengths: list[int], max_bytes: int, sizes: list[int]
) -> None:
    files = items(*lengths)
    chunks = list(chunked(files, max_bytes))
    assert [len(c) for c in chunks] == sizes
    assert [item for c in chunks for item in c] == files  # nothing lost, order kept
    for chunk in chunks[:-1]:
        # Each full chunk reached the limit, and only with its last entry.
        size = sum(len(name) + 32 for name, _ in chunk)
        assert size >= max_bytes
        assert size - (len(chunk[-1][0]) + 32) < max_bytes


def test_chunked_accepts_a_generator() -> None:
    chunks = list(chunked(((bytes([i]), S1) for i in range(1, 10)), 66))
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 1]


def test_first_scan_makes_every_file_an_addition() -> None:
    state = FolderState()
    state.begin_scan()
    scanned = {A: S1, B: S2}
    assert state.finish_scan(scanned, 7) == (2, set())
    scanned[C] = S3  # the state holds its own copy
    assert state.files == {A: S1, B: S2}
    assert state.take_batch(100) == Batch(
        1, (Change(Op.ADD, A, S1), Change(Op.ADD, B, S2)), observed_ns=7
    )


def test_first_scan_with_events_during_it() -> None:
    state = FolderState()
    state.begin_scan()
    state.observe(C, S2, 5)  # created after the scan passed
    state.observe(B, None, 6)  # deleted after the scan saw it
    changed, touched = state.finish_scan({A: S1, B: S1}, 7)
    assert (changed, touched) == (1, {B, C})
    assert state.files == {A: S1, C: S2}
    assert net(state.take_batch(100)) == {Change(Op.ADD, A, S1), Change(Op.ADD, C, S2)}


def test_scan_after_the_folder_was_forgotten_owes_only_the_net_change() -> None:
    state = settled({A: S1})
    state.observe(A, None, 2)  # the folder vanished; the removal is not sent yet
    state.begin_scan()
    assert state.finish_scan({A: S1, B: S2}, 3) == (2, set())
    assert net(state.take_batch(100)) == {Change(Op.ADD, B, S2)}  # A is back as it was
