"""The protocol-neutral index core: per-watcher file sets and one sorted view.

Pure and I/O-free. Every mutation returns the `Event`s it caused, each with its
own index version, so that adapters can publish them; the index never calls
out. All methods are meant to be called from one owner (the event loop).

Memory is the budget that matters at a million files, so each file costs two
Python objects and no more:

- its *key*, one `bytes`: the name as code-point-ordered UTF-8, a NUL, and the
  watcher's node. Byte order of keys is the order of `/files/` (filename, then
  node: names cannot hold NUL, so a name sorts before any longer name it
  prefixes). The key lives in the sorted pages and is the key of its watcher's
  dict; the raw name and the display name are derived from it when read.
- its *meta*, one `int`: size and mtime packed (see `pack_meta`), or
  `NO_META` when the watcher reports neither (the legacy protocol).
"""

from __future__ import annotations

import collections
import enum
import itertools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, overload

from aggregator.errors import LimitExceededError, UnknownWatcherError
from aggregator.pages import Page, SortedPages

Key = bytes
Meta = int
_MTIME_BITS = 64
_MTIME_MASK = (1 << _MTIME_BITS) - 1
NO_META: Meta = -1
"""The meta of a file whose size and mtime are unknown (packed metas are never negative)."""


def pack_meta(size: int, mtime_ns: int) -> Meta:
    """A file's size (>= 0) and mtime (int64) as the one int the index keeps."""
    return size << _MTIME_BITS | mtime_ns & _MTIME_MASK


def unpack_meta(meta: Meta) -> tuple[int, int] | tuple[None, None]:
    """(size, mtime_ns) of a packed meta; (None, None) for `NO_META`."""
    if meta < 0:
        return None, None
    mtime_ns = meta & _MTIME_MASK
    if mtime_ns >> (_MTIME_BITS - 1):  # before 1970: int64 two's complement
        mtime_ns -= 1 << _MTIME_BITS
    return meta >> _MTIME_BITS, mtime_ns


def node_suffix(node: str) -> bytes:
    """What follows the name in every key of `node`."""
    return b"\x00" + node.encode("utf-8", "surrogatepass")


def make_key(raw: bytes, suffix: bytes) -> Key:
    """The key of a raw name (no NUL in it) for the node whose suffix is given.

    Valid UTF-8 is its own code-point order; undecodable bytes are ordered as
    their display form (U+DC80..U+DCFF, see `aggregator.names`).
    """
    if raw.isascii():
        return raw + suffix
    display = raw.decode("utf-8", "surrogateescape")
    return display.encode("utf-8", "surrogatepass") + suffix


def split_key(key: Key) -> tuple[str, str]:
    """(display name, node) of a key."""
    cut = key.index(0)
    return (
        key[:cut].decode("utf-8", "surrogatepass"),
        key[cut + 1 :].decode("utf-8", "surrogatepass"),
    )


def key_filename(key: Key) -> str:
    """The display name of a key."""
    return key[: key.index(0)].decode("utf-8", "surrogatepass")


def key_raw_name(key: Key) -> bytes:
    """The raw name of a key, byte for byte as the watcher sent it."""
    return key_filename(key).encode("utf-8", "surrogateescape")


class Op(enum.Enum):
    """A change as reported by a watcher. ADD and MODIFY are both upserts."""

    ADD = "add"
    REMOVE = "remove"
    MODIFY = "modify"


class Change(NamedTuple):
    """One reported change of one file. Plain `(op, name, meta)` tuples do as well."""

    op: Op
    name: bytes
    meta: Meta = 0


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
    size: int | None  # None: unknown (legacy watchers report no size or time)
    mtime_ns: int | None


def entry_of(key: Key, meta: Meta) -> Entry:
    """The reader's view of one key and its meta."""
    filename, node = split_key(key)
    size, mtime_ns = unpack_meta(meta)
    return Entry(filename, node, filename.encode("utf-8", "surrogateescape"), size, mtime_ns)


class Event(NamedTuple):
    """One applied change, with the index version it produced."""

    kind: EventKind
    key: Key
    meta: Meta
    version: int

    @property
    def entry(self) -> Entry:
        """The entry as it was after (or, for REMOVED, before) the change."""
        return entry_of(self.key, self.meta)


_new_event = tuple.__new__  # Event(...) without the Python-level __new__: hot


class AddedRun(Sequence[Event]):
    """ADDED events of consecutive versions for a bulk add, each made when read.

    A snapshot of a million files is published as this, two lists, rather than
    a million event tuples that most readers never look at.
    """

    __slots__ = ("_first", "_keys", "_metas")

    def __init__(self, keys: list[Key], metas: list[Meta], first_version: int) -> None:
        self._keys = keys
        self._metas = metas
        self._first = first_version

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, i: int) -> Event: ...
    @overload
    def __getitem__(self, i: slice) -> list[Event]: ...
    def __getitem__(self, i: int | slice) -> Event | list[Event]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self._keys)
        key, meta = self._keys[i], self._metas[i]  # IndexError past the end
        return _new_event(Event, (EventKind.ADDED, key, meta, self._first + i))


def count_kinds(events: Sequence[Event]) -> Mapping[EventKind, int]:
    """How many events of each kind (without making the events of an `AddedRun`)."""
    if isinstance(events, AddedRun):
        return {EventKind.ADDED: len(events)} if events else {}
    return collections.Counter(map(operator.itemgetter(0), events))


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
    suffix: bytes
    applied_sequence: int = 0
    files: dict[Key, Meta] = field(default_factory=dict)
    # A snapshot being received; swapped in by commit_snapshot.
    pending: dict[Key, Meta] | None = None
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


_Keyed = tuple[Op, Key, Meta]
_BULK_MIN = 10_000  # below this many new names, plain inserts are as fast


class Index:
    """Every file of every watcher, sorted by filename then watcher name.

    Args:
        max_files_per_watcher: a snapshot or batch that would take one watcher
            beyond this many files is refused whole.
        first_version: the version of the empty index. An aggregator starts from
            the microseconds since the epoch, so that versions never repeat across
            restarts: a reader resuming from a version of an earlier process gets
            the list again instead of this process's events of that number.
    """

    def __init__(self, max_files_per_watcher: int = 10_000_000, first_version: int = 0) -> None:
        self._max_files = max_files_per_watcher
        self._watchers: dict[str, _Watcher] = {}
        self._by_suffix: dict[bytes, _Watcher] = {}
        self._keys: SortedPages[Key] = SortedPages()
        self._version = first_version

    # ------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        """Bumped by one for every applied event."""
        return self._version

    def __len__(self) -> int:
        return len(self._keys)

    def entries(self) -> Iterator[Entry]:
        """Iterate all entries in order. Do not mutate the index meanwhile."""
        for key in self._keys:
            yield entry_of(key, self.meta(key))

    def pages(self) -> list[Page[Key]]:
        """The sorted keys in pages, each with a serial that changes when the page does.

        Read-only, valid until the next mutation; see `meta`.
        """
        return self._keys.pages()

    def meta(self, key: Key) -> Meta:
        """The meta of a key from `pages`."""
        return self._by_suffix[key[key.index(0) :]].files[key]

    def page_after(self, after: tuple[bytes, str] | None, limit: int) -> tuple[Entry, ...]:
        """Up to `limit` entries following the entry (raw name, node), or from the start."""
        start = None if after is None else make_key(after[0], node_suffix(after[1]))
        out: list[Entry] = []
        for key in self._keys.after(start):
            if len(out) == limit:
                break
            out.append(entry_of(key, self.meta(key)))
        return tuple(out)

    def has_after(self, entry: Entry) -> bool:
        """Whether any entry sorts after `entry`."""
        key = make_key(entry.raw_name, node_suffix(entry.node))
        return next(self._keys.after(key), None) is not None

    @property
    def watcher_count(self) -> int:
        """Watchers the index holds."""
        return len(self._watchers)

    def filenames(self) -> Iterator[str]:
        """Iterate the display names in order (the default `/files/` body)."""
        for key in self._keys:
            yield key_filename(key)

    def watcher(self, node: str) -> WatcherInfo | None:
        """The position of a watcher, or None if the index does not hold it."""
        w = self._watchers.get(node)
        if w is None:
            return None
        return WatcherInfo(node, w.epoch, w.applied_sequence, len(w.files), w.synced)

    def watchers(self) -> tuple[WatcherInfo, ...]:
        """Every watcher the index holds."""
        return tuple(self.watcher(node) for node in self._watchers)  # type: ignore[misc]

    def files_of(self, node: str) -> Mapping[bytes, Meta]:
        """A copy of one watcher's files: raw name -> meta."""
        w = self._watchers.get(node)
        if w is None:
            return {}
        return {key_raw_name(key): meta for key, meta in w.files.items()}

    # ------------------------------------------------------------ snapshots

    def begin_snapshot(self, node: str, epoch: str) -> None:
        """Start receiving a snapshot for `node` in `epoch`, built aside.

        The watcher's current files stay visible until the commit, so that a
        restarted watcher never shows twice or vanishes in between.
        """
        w = self._watchers.get(node)
        if w is None:
            w = self._watchers[node] = _Watcher(epoch=epoch, suffix=node_suffix(node))
            self._by_suffix[w.suffix] = w
        elif w.epoch != epoch:
            # A new instance: its old position means nothing any more.
            w.epoch = epoch
            w.applied_sequence = 0
            w.synced = False
        w.pending = {}

    def extend_snapshot(self, node: str, files: Iterable[tuple[bytes, Meta]]) -> None:
        """Add (raw name, meta) pairs to the snapshot being received."""
        w = self._require(node)
        pending = w.pending
        if pending is None:
            raise UnknownWatcherError(f"no snapshot in progress for {node!r}")
        suffix = w.suffix
        for name, meta in files:
            pending[name + suffix if name.isascii() else make_key(name, suffix)] = meta
        if len(pending) > self._max_files:
            w.pending = None
            raise LimitExceededError(
                f"snapshot of {node!r} exceeds {self._max_files} files per watcher"
            )

    def commit_snapshot(self, node: str, sequence: int) -> Sequence[Event]:
        """Swap the received snapshot in at `sequence`; absent entries are removed."""
        w = self._require(node)
        new = w.pending
        if new is None:
            raise UnknownWatcherError(f"no snapshot in progress for {node!r}")
        w.pending = None
        old = w.files
        events: list[Event] = []
        for key in [k for k in old if k not in new]:
            events.append(self._remove(w, key))
        fresh = []
        for key, meta in new.items():
            current = old.get(key)
            if current is None:
                fresh.append(key)
            elif current != meta:
                events.append(self._set(w, key, meta))
        w.applied_sequence = sequence
        w.synced = True
        if len(fresh) > _BULK_MIN and len(fresh) > len(self._keys) // 4:
            added = self._bulk_add(w, fresh, new)
            return (*events, *added) if events else added
        for key in fresh:
            events.append(self._set(w, key, new[key]))
        return tuple(events)

    def abort_snapshot(self, node: str) -> None:
        """Drop a snapshot in progress, if any."""
        w = self._watchers.get(node)
        if w is not None:
            w.pending = None

    # ------------------------------------------------------------ batches

    def apply_batch(
        self, node: str, epoch: str, sequence: int, changes: Iterable[tuple[Op, bytes, Meta]]
    ) -> BatchResult:
        """Apply one batch of (op, raw name, meta) if it is the next in sequence.

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
        suffix, files = w.suffix, w.files
        keyed = [
            (op, name + suffix if name.isascii() else make_key(name, suffix), meta)
            for op, name, meta in changes
        ]
        if len(files) + len(keyed) > self._max_files:
            self._check_limit(node, files, keyed)
        events: list[Event] = []
        for op, key, meta in keyed:
            if op is Op.REMOVE:
                if key in files:
                    events.append(self._remove(w, key))
            elif files.get(key) != meta:
                events.append(self._set(w, key, meta))
        w.applied_sequence = sequence
        return BatchResult(BatchStatus.APPLIED, tuple(events), sequence)

    # ------------------------------------------------------------ watchers

    def remove_watcher(self, node: str) -> tuple[Event, ...]:
        """Forget a watcher and remove all its files."""
        w = self._watchers.pop(node, None)
        if w is None:
            return ()
        del self._by_suffix[w.suffix]
        return tuple(self._remove(w, key) for key in list(w.files))

    # ------------------------------------------------------------ internals

    def _require(self, node: str) -> _Watcher:
        w = self._watchers.get(node)
        if w is None:
            raise UnknownWatcherError(f"unknown watcher {node!r}")
        return w

    def _check_limit(self, node: str, files: dict[Key, Meta], keyed: list[_Keyed]) -> None:
        """Refuse a batch that takes `files` beyond the limit (net: a rename at it is fine)."""
        present = {key: op is not Op.REMOVE for op, key, _ in keyed}
        delta = sum(int(now) - int(key in files) for key, now in present.items())
        if len(files) + delta > self._max_files:
            raise LimitExceededError(f"{node!r} would exceed {self._max_files} files per watcher")

    def _bulk_add(self, w: _Watcher, keys: list[Key], snapshot: dict[Key, Meta]) -> AddedRun:
        """Add many new keys of `snapshot` at once: one sort and one merge, not n inserts."""
        keys.sort()
        if w.files:
            w.files.update((key, snapshot[key]) for key in keys)
        else:  # every key of the snapshot is new: adopt it, no copy
            w.files = snapshot
        run = AddedRun(keys, [snapshot[key] for key in keys], self._version + 1)
        self._version += len(keys)
        if len(self._keys):
            self._keys.rebuild(sorted(itertools.chain(self._keys, keys)))  # timsort: two runs
        else:
            self._keys.rebuild(keys)
        return run

    def _set(self, w: _Watcher, key: Key, meta: Meta) -> Event:
        """Add or update a key whose meta differs from what the index holds."""
        old = w.files.get(key)
        w.files[key] = meta
        if old is None:
            self._keys.add(key)
        else:
            self._keys.touch(key)  # the page's detail encoding is stale now
        self._version += 1
        kind = EventKind.ADDED if old is None else EventKind.MODIFIED
        return _new_event(Event, (kind, key, meta, self._version))

    def _remove(self, w: _Watcher, key: Key) -> Event:
        meta = w.files.pop(key)
        self._keys.remove(key)
        self._version += 1
        return _new_event(Event, (EventKind.REMOVED, key, meta, self._version))
