"""The protocol-neutral index core: per-watcher file sets and one sorted view.

Pure and I/O-free. Every mutation returns the `Event`s it caused, each with its
own index version, so that adapters can publish them; the index never calls
out. All methods are meant to be called from one owner (the event loop).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from aggregator.errors import LimitExceededError, UnknownWatcherError
from aggregator.names import display_name
from aggregator.pages import Page, SortedPages

# The value types are NamedTuples, not dataclasses: a snapshot of a million files
# creates millions of them, and a tuple is built and compared in C.


class FileMeta(NamedTuple):
    """What the index keeps of one file besides its name."""

    size: int = 0
    mtime_ns: int = 0


class Op(enum.Enum):
    """A change as reported by a watcher. ADD and MODIFY are both upserts."""

    ADD = "add"
    REMOVE = "remove"
    MODIFY = "modify"


class Change(NamedTuple):
    """One reported change of one file."""

    op: Op
    name: bytes
    meta: FileMeta = FileMeta()


class EventKind(enum.Enum):
    """What actually happened to the index (after idempotence is applied)."""

    ADDED = "added"
    REMOVED = "removed"
    MODIFIED = "modified"


class Entry(NamedTuple):
    """One file of one watcher, as readers see it."""

    filename: str
    node: str
    raw_name: bytes
    size: int
    mtime_ns: int


class Event(NamedTuple):
    """One applied change, with the index version it produced."""

    kind: EventKind
    entry: Entry
    version: int


class BatchStatus(enum.Enum):
    """How `Index.apply_batch` treated a batch."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # sequence already applied: ignored
    GAP = "gap"  # sequence beyond the next one: nothing applied, resync needed


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one batch: its status, the events, the position after it."""

    status: BatchStatus
    events: tuple[Event, ...]
    applied_sequence: int


@dataclass(slots=True)
class _Watcher:
    epoch: str
    applied_sequence: int = 0
    files: dict[bytes, FileMeta] = field(default_factory=dict)
    # A snapshot being received; swapped in by commit_snapshot.
    pending: dict[bytes, FileMeta] | None = None
    # False until its first snapshot is committed: batches before that are gaps.
    synced: bool = False


@dataclass(frozen=True, slots=True)
class WatcherInfo:
    """A read-only view of one watcher's position."""

    node: str
    epoch: str
    applied_sequence: int
    file_count: int
    synced: bool


_SortKey = tuple[str, str]
_BULK_MIN = 10_000  # below this many new names, plain inserts are as fast


class Index:
    """Every file of every watcher, sorted by filename then watcher name.

    Args:
        max_files_per_watcher: a snapshot or batch that would take one watcher
            beyond this many files is refused whole.
    """

    def __init__(self, max_files_per_watcher: int = 10_000_000) -> None:
        self._max_files = max_files_per_watcher
        self._watchers: dict[str, _Watcher] = {}
        # (display name, node) -> (raw name, meta); ordered by code point.
        self._keys: SortedPages[_SortKey] = SortedPages()
        self._values: dict[_SortKey, tuple[bytes, FileMeta]] = {}
        self._version = 0

    # ------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        """Bumped by one for every applied event."""
        return self._version

    def __len__(self) -> int:
        return len(self._keys)

    def entries(self) -> Iterator[Entry]:
        """Iterate all entries in order. Do not mutate the index meanwhile."""
        values = self._values
        for key in self._keys:
            raw, meta = values[key]
            yield Entry(key[0], key[1], raw, meta.size, meta.mtime_ns)

    def pages(self) -> list[Page[_SortKey]]:
        """The sorted keys in pages, each with a serial that changes when the page does.

        Read-only, valid until the next mutation; see `value`.
        """
        return self._keys.pages()

    def value(self, key: _SortKey) -> tuple[bytes, FileMeta]:
        """The raw name and meta of a key from `pages`."""
        return self._values[key]

    def page_after(self, after: tuple[bytes, str] | None, limit: int) -> tuple[Entry, ...]:
        """Up to `limit` entries following the entry (raw name, node), or from the start."""
        start = None if after is None else (display_name(after[0]), after[1])
        out = []
        for key in itertools.islice(self._keys.after(start), limit):
            raw, meta = self._values[key]
            out.append(Entry(key[0], key[1], raw, meta.size, meta.mtime_ns))
        return tuple(out)

    def has_after(self, entry: Entry) -> bool:
        """Whether any entry sorts after `entry`."""
        return next(self._keys.after((entry.filename, entry.node)), None) is not None

    @property
    def watcher_count(self) -> int:
        """Watchers the index holds."""
        return len(self._watchers)

    def filenames(self) -> Iterator[str]:
        """Iterate the display names in order (the default `/files/` body)."""
        for filename, _node in self._keys:
            yield filename

    def watcher(self, node: str) -> WatcherInfo | None:
        """The position of a watcher, or None if the index does not hold it."""
        w = self._watchers.get(node)
        if w is None:
            return None
        return WatcherInfo(node, w.epoch, w.applied_sequence, len(w.files), w.synced)

    def watchers(self) -> tuple[WatcherInfo, ...]:
        """Every watcher the index holds."""
        return tuple(self.watcher(node) for node in self._watchers)  # type: ignore[misc]

    def files_of(self, node: str) -> Mapping[bytes, FileMeta]:
        """A copy of one watcher's files."""
        w = self._watchers.get(node)
        return dict(w.files) if w else {}

    # ------------------------------------------------------------ snapshots

    def begin_snapshot(self, node: str, epoch: str) -> None:
        """Start receiving a snapshot for `node` in `epoch`, built aside.

        The watcher's current files stay visible until the commit, so that a
        restarted watcher never shows twice or vanishes in between.
        """
        w = self._watchers.get(node)
        if w is None:
            w = self._watchers[node] = _Watcher(epoch=epoch)
        elif w.epoch != epoch:
            # A new instance: its old position means nothing any more.
            w.epoch = epoch
            w.applied_sequence = 0
            w.synced = False
        w.pending = {}

    def extend_snapshot(self, node: str, files: Iterable[tuple[bytes, FileMeta]]) -> None:
        """Add files to the snapshot being received."""
        w = self._require(node)
        if w.pending is None:
            raise UnknownWatcherError(f"no snapshot in progress for {node!r}")
        pending = w.pending
        for name, meta in files:
            pending[name] = meta
        if len(pending) > self._max_files:
            w.pending = None
            raise LimitExceededError(
                f"snapshot of {node!r} exceeds {self._max_files} files per watcher"
            )

    def commit_snapshot(self, node: str, sequence: int) -> tuple[Event, ...]:
        """Swap the received snapshot in at `sequence`; absent entries are removed."""
        w = self._require(node)
        if w.pending is None:
            raise UnknownWatcherError(f"no snapshot in progress for {node!r}")
        new, w.pending = w.pending, None
        old = w.files
        events: list[Event] = []
        for name in [n for n in old if n not in new]:
            events.append(self._remove(node, w, name))
        fresh: list[bytes] = []
        for name, meta in new.items():
            current = old.get(name)
            if current is None:
                fresh.append(name)
            elif current != meta:
                events.append(self._modify(node, w, name, meta))
        if len(fresh) > _BULK_MIN and len(fresh) > len(self._keys) // 4:
            events.extend(self._bulk_add(node, w, fresh, new))
        else:
            for name in fresh:
                events.append(self._modify(node, w, name, new[name]))
        w.applied_sequence = sequence
        w.synced = True
        return tuple(events)

    def abort_snapshot(self, node: str) -> None:
        """Drop a snapshot in progress, if any."""
        w = self._watchers.get(node)
        if w is not None:
            w.pending = None

    # ------------------------------------------------------------ batches

    def apply_batch(
        self, node: str, epoch: str, sequence: int, changes: Iterable[Change]
    ) -> BatchResult:
        """Apply one batch if it is the next in sequence.

        A sequence at or below the applied one is ignored (DUPLICATE); one
        beyond the next is a GAP: nothing is applied, the caller must resync.
        Within a batch, add and modify are upserts and remove of an absent name
        does nothing, so replays converge.
        """
        w = self._require(node)
        if w.epoch != epoch:
            raise UnknownWatcherError(f"{node!r} is not in epoch {epoch!r}")
        if not w.synced or sequence > w.applied_sequence + 1:
            return BatchResult(BatchStatus.GAP, (), w.applied_sequence)
        if sequence <= w.applied_sequence:
            return BatchResult(BatchStatus.DUPLICATE, (), w.applied_sequence)
        changes = tuple(changes)
        # The net effect on the count (a rename at the limit is fine); O(batch).
        present = {c.name: c.op is not Op.REMOVE for c in changes}
        delta = sum(int(now) - int(name in w.files) for name, now in present.items())
        if len(w.files) + delta > self._max_files:
            raise LimitExceededError(f"{node!r} would exceed {self._max_files} files per watcher")
        events: list[Event] = []
        for change in changes:
            if change.op is Op.REMOVE:
                if change.name in w.files:
                    events.append(self._remove(node, w, change.name))
            else:
                ev = self._upsert(node, w, change.name, change.meta)
                if ev is not None:
                    events.append(ev)
        w.applied_sequence = sequence
        return BatchResult(BatchStatus.APPLIED, tuple(events), sequence)

    # ------------------------------------------------------------ watchers

    def remove_watcher(self, node: str) -> tuple[Event, ...]:
        """Forget a watcher and remove all its files."""
        w = self._watchers.pop(node, None)
        if w is None:
            return ()
        return tuple(self._remove(node, w, name) for name in list(w.files))

    # ------------------------------------------------------------ internals

    def _require(self, node: str) -> _Watcher:
        w = self._watchers.get(node)
        if w is None:
            raise UnknownWatcherError(f"unknown watcher {node!r}")
        return w

    def _bulk_add(
        self, node: str, w: _Watcher, names: list[bytes], metas: Mapping[bytes, FileMeta]
    ) -> list[Event]:
        """Add many new names at once: one sort and one merge instead of n inserts."""
        added = sorted(((display_name(n), node), n) for n in names)
        events = []
        for key, name in added:
            meta = metas[name]
            w.files[name] = meta
            self._values[key] = (name, meta)
            self._version += 1
            entry = Entry(key[0], node, name, meta.size, meta.mtime_ns)
            events.append(Event(EventKind.ADDED, entry, self._version))
        self._keys.rebuild(heapq.merge(self._keys, (key for key, _ in added)))
        return events

    def _upsert(self, node: str, w: _Watcher, name: bytes, meta: FileMeta) -> Event | None:
        if w.files.get(name) == meta:
            return None
        return self._modify(node, w, name, meta)

    def _modify(self, node: str, w: _Watcher, name: bytes, meta: FileMeta) -> Event:
        """Add or update a name whose meta differs from what the index holds."""
        old = w.files.get(name)
        w.files[name] = meta
        filename = display_name(name)
        key = (filename, node)
        if old is None:
            self._keys.add(key)
        else:
            self._keys.touch(key)  # the page's detail encoding is stale now
        self._values[key] = (name, meta)
        self._version += 1
        kind = EventKind.ADDED if old is None else EventKind.MODIFIED
        entry = Entry(filename, node, name, meta.size, meta.mtime_ns)
        return Event(kind, entry, self._version)

    def _remove(self, node: str, w: _Watcher, name: bytes) -> Event:
        meta = w.files.pop(name)
        filename = display_name(name)
        key = (filename, node)
        self._keys.remove(key)
        del self._values[key]
        self._version += 1
        entry = Entry(filename, node, name, meta.size, meta.mtime_ns)
        return Event(EventKind.REMOVED, entry, self._version)
