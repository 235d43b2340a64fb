"""Hostile peers: property-based input on the Sync stream and the legacy endpoints.

One aggregator for the whole module, with a well-behaved gRPC watcher and a
well-behaved legacy watcher beside it. Hypothesis drives:
- `Sync` streams of arbitrary, malformed and out-of-order messages (and raw
  bytes that may not even parse): each stream ends with OK (what is valid but
  out of order is answered with a resync, never an error), INVALID_ARGUMENT
  naming the problem, or ALREADY_EXISTS for another watcher's name, exactly as
  an independent model of the spec predicts; never UNKNOWN or INTERNAL.
- `POST /hello`, `POST /bye`, `PATCH /files` with arbitrary bodies: 200 for
  what is well-formed, 400 (or 413 beyond the size limit) with a problem+json
  body naming the problem otherwise; never a 5xx.
Afterwards the aggregator is alive, the good watchers were never disturbed,
and once the TTL has passed everything the hostile peers created is gone.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gen import filewatch_pb2 as pb
from tests.faults.conftest import (
    SYNC_TIMEOUT,
    Aggregator,
    Processes,
    RawSync,
    Watcher,
    batch_msg,
    chunk_msg,
    fill,
    folder_names,
    hello_msg,
    measured,
    start_aggregator_in,
    start_watcher_in,
)
from tests.support import wait_for

TTL = 2.0
MAX_BODY = 65_536
GOOD = "good"
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Env:
    """The module's aggregator, its two good watchers, and what the tests counted."""

    agg: Aggregator
    grpc_w: Watcher
    legacy_w: Watcher
    channel: grpc.Channel
    rss_start_kib: int
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def legacy_node(self) -> str:
        """The legacy watcher's node name (its address)."""
        return f"127.0.0.1:{self.legacy_w.http_port}"

    def count(self, outcome: str) -> None:
        """Count an outcome (reported at the end)."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def good_lists_intact(self) -> bool:
        """Both good watchers' lists equal their folders."""
        entries = self.agg.entries()
        by_node: dict[str, list[str]] = {}
        for e in entries:
            by_node.setdefault(e["node"], []).append(e["filename"])
        return by_node.get(GOOD) == folder_names(self.grpc_w.folder) and by_node.get(
            self.legacy_node
        ) == folder_names(self.legacy_w.folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One aggregator (TTL 2 s, small limits) with a good gRPC and a good legacy watcher."""
    base = tmp_path_factory.mktemp("hostile")
    procs = Processes(base / "logs")
    channel: grpc.Channel | None = None
    try:
        agg = start_aggregator_in(
            procs,
            "--max-body-bytes", str(MAX_BODY),
            "--max-files-per-watcher", "1000",
            "--fetch-timeout", "1",
            "--gap-wait", "0.2",
            "--hello-timeout", "2",
            ttl=TTL,
        )  # fmt: skip
        fill(base / "good-grpc", 20, "g")
        fill(base / "good-legacy", 20, "l")
        grpc_w = start_watcher_in(procs, base / "good-grpc", agg.grpc_url, name=GOOD)
        legacy_w = start_watcher_in(procs, base / "good-legacy", agg.http_url)
        channel = grpc.insecure_channel(agg.grpc_target)
        e = Env(agg, grpc_w, legacy_w, channel, 0)
        wait_for(e.good_lists_intact, SYNC_TIMEOUT, what="the good watchers listed")
        e.rss_start_kib = agg.proc.rss_kib()
        yield e
    finally:
        if channel is not None:
            channel.close()
        procs.stop_all()


# ---------------------------------------------------------------- the Sync stream

OK, INVALID, TAKEN = "OK", "INVALID_ARGUMENT", "ALREADY_EXISTS"

NAME_FIELD_MAX = 256  # hello.node / hello.epoch length the aggregator documents
NAME_MAX = 1024


def _valid_name(raw: bytes) -> bool:
    return (
        0 < len(raw) <= NAME_MAX
        and b"/" not in raw
        and b"\0" not in raw
        and raw not in (b".", b"..")
    )


def expected_sync(messages: list[pb.WatcherMessage | bytes], taken: set[str]) -> str:
    """What the spec says a stream of these messages ends with (we half-close at the end)."""
    started = in_snapshot = False
    count = 0
    for item in messages:
        if isinstance(item, bytes):
            try:
                msg = pb.WatcherMessage.FromString(item)
            except DecodeError:
                return INVALID
        else:
            msg = item
        kind = msg.WhichOneof("kind")
        if not started:
            if kind != "hello":
                return INVALID
            hello = msg.hello
            if not all(0 < len(v) <= NAME_FIELD_MAX for v in (hello.node, hello.epoch)):
                return INVALID
            if hello.node in taken:
                return TAKEN
            started = True
            continue
        if kind is None or kind == "hello":
            return INVALID
        if kind == "goodbye":
            return OK
        if kind == "snapshot_chunk":
            if not all(_valid_name(f.name) for f in msg.snapshot_chunk.files):
                return INVALID
            in_snapshot = True
            count += len(msg.snapshot_chunk.files)
        elif kind == "snapshot_end":
            if msg.snapshot_end.count != (count if in_snapshot else 0):
                return INVALID
            in_snapshot, count = False, 0
        elif kind == "batch":
            changes = msg.batch.changes
            if not all(c.op in (1, 2, 3) and _valid_name(c.file.name) for c in changes):
                return INVALID
            if in_snapshot:
                return INVALID
    return OK


u64 = st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1))
i64 = st.integers(-(2**63), 2**63 - 1)
good_names = st.one_of(
    st.sampled_from([b"a", b"b.txt", b"caf\xe9", "🐱".encode(), b" x ", b"\\", b'"', b"y" * 1024]),
    st.binary(min_size=1, max_size=30).filter(_valid_name),
)
bad_names = st.sampled_from([b"", b".", b"..", b"a/b", b"nul\0", b"x" * 1025])
# Mostly valid, so that streams get past the first message; sometimes anything at all.
names = st.one_of(good_names, good_names, good_names, bad_names, st.binary(max_size=30))
file_infos = st.builds(pb.FileInfo, name=names, size=u64, mtime_ns=i64)
valid_ops = st.sampled_from([pb.OP_ADD, pb.OP_REMOVE, pb.OP_MODIFY])
ops = st.one_of(valid_ops, valid_ops, valid_ops, st.integers(0, 9))
texts = st.text(max_size=20)
KINDS = ["chunk", "end", "batch", "batch", "heartbeat", "chunk", "end", "batch", "heartbeat"]
RARE_KINDS = ["hello", "goodbye", "empty", "raw"]


@st.composite
def watcher_messages(draw: st.DrawFn, taken: tuple[str, ...]) -> pb.WatcherMessage | bytes:
    """One message of any kind, well-formed or not (or raw bytes)."""
    kind = draw(
        st.one_of(st.sampled_from(KINDS), st.sampled_from(KINDS), st.sampled_from(RARE_KINDS))
    )
    if kind == "hello":
        node = draw(st.one_of(texts, st.sampled_from(taken), st.text(min_size=250)))
        return pb.WatcherMessage(
            hello=pb.Hello(
                node=node, epoch=draw(texts), folder=draw(texts), last_sequence=draw(u64)
            )
        )
    if kind == "chunk":
        files = draw(st.lists(file_infos, max_size=4))
        return pb.WatcherMessage(snapshot_chunk=pb.SnapshotChunk(files=files))
    if kind == "end":
        end = pb.SnapshotEnd(sequence=draw(u64), count=draw(st.integers(0, 6)))
        return pb.WatcherMessage(snapshot_end=end)
    if kind == "batch":
        changes = draw(st.lists(st.builds(pb.Change, op=ops, file=file_infos), max_size=4))
        batch = pb.Batch(
            sequence=draw(u64),
            changes=changes,
            observed_unix_ns=draw(i64),
            traceparent=draw(st.one_of(texts, st.just("00-" + "a" * 32 + "-" + "b" * 16 + "-01"))),
            tracestate=draw(texts),
        )
        return pb.WatcherMessage(batch=batch)
    if kind == "heartbeat":
        beat = pb.Heartbeat(sequence=draw(u64), want_ack=draw(st.booleans()))
        return pb.WatcherMessage(heartbeat=beat)
    if kind == "goodbye":
        return pb.WatcherMessage(goodbye=pb.Goodbye())
    if kind == "empty":
        return pb.WatcherMessage()
    return draw(st.binary(max_size=40))


@st.composite
def sync_streams(draw: st.DrawFn, taken: tuple[str, ...]) -> list[pb.WatcherMessage | bytes]:
    """A hello with a fresh name first (usually), another's name, or anything; then anything."""
    rest = draw(st.lists(watcher_messages(taken), max_size=12))
    start = draw(st.sampled_from(["fresh", "fresh", "fresh", "fresh", "taken", "none"]))
    if start == "fresh":
        epoch = draw(st.text(min_size=1, max_size=8))
        return [hello_msg(f"hostile-{uuid.uuid4().hex[:12]}", epoch), *rest]
    if start == "taken":
        return [
            hello_msg(draw(st.sampled_from(taken)), draw(st.text(min_size=1, max_size=8))),
            *rest,
        ]
    return rest


def _good_names(e: Env) -> tuple[str, ...]:
    return (GOOD, e.legacy_node)


def test_arbitrary_sync_streams_get_ok_or_a_clear_invalid_argument(env: Env) -> None:
    taken = set(_good_names(env))
    started = time.monotonic()

    @SETTINGS
    @given(messages=sync_streams(_good_names(env)))
    def run(messages: list[pb.WatcherMessage | bytes]) -> None:
        sync = RawSync(env.channel, timeout=15.0)
        sync.send(*messages)
        sync.close()
        code, details = sync.status(15.0)
        answers = sync.answers()
        expected = expected_sync(messages, taken)
        env.count(f"sync {code.name}")
        if any(a.WhichOneof("kind") == "resync" for a in answers):
            env.count("sync streams answered with a resync")
        assert code.name == expected, (code, details, expected)
        if code is not grpc.StatusCode.OK:
            assert details and not details.startswith("Unexpected"), details
        for answer in answers:
            assert answer.WhichOneof("kind") in ("welcome", "ack", "resync"), answer
        assert env.agg.proc.alive, env.agg.proc.log_text()[-3000:]

    run()
    measured("hypothesis: 100 Sync streams", time.monotonic() - started)
    assert env.good_lists_intact()


def test_garbage_bytes_on_the_sync_stream_are_invalid_argument(env: Env) -> None:
    """Bytes that are not a WatcherMessage at all: INVALID_ARGUMENT, not UNKNOWN."""
    for prefix in ([], [hello_msg(f"garbage-{uuid.uuid4().hex[:8]}", "e")]):
        sync = RawSync(env.channel)
        sync.send(*prefix, b"\xff\xff\xff\xff")
        sync.close()
        code, details = sync.status()
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert not details.startswith("Unexpected"), details


def test_a_batch_before_any_snapshot_is_answered_with_a_resync(env: Env) -> None:
    """Out of order, not malformed: the aggregator asks for a snapshot (a gap)."""
    node = f"early-{uuid.uuid4().hex[:8]}"
    sync = RawSync(env.channel)
    sync.send(hello_msg(node, "e1"), batch_msg(1, (pb.OP_ADD, b"a.txt")))
    assert not sync.recv_kind("welcome").welcome.resume
    resync = sync.recv_kind("resync")
    assert resync.resync.reason == "gap"
    sync.send(chunk_msg([b"a.txt"]), pb.WatcherMessage(snapshot_end=pb.SnapshotEnd(count=1)))
    sync.recv_kind("ack")
    assert [e["filename"] for e in env.agg.entries() if e["node"] == node] == ["a.txt"]
    sync.send(pb.WatcherMessage(goodbye=pb.Goodbye()))
    sync.close()
    assert sync.status()[0] is grpc.StatusCode.OK


# ---------------------------------------------------------------- the legacy endpoints

INSTANCE_MAX = 128
U64_MAX = 2**64 - 1


def _is_int(value: object) -> bool:
    """An integer JSON number: 7, or 7.0 (JSON's same number), never true."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_instance(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= INSTANCE_MAX


def _valid_filename(value: object) -> bool:
    return isinstance(value, str) and _valid_name(value.encode("utf-8"))


def expected_legacy(path: str, body: object) -> int:
    """200 for a well-formed body, 400 otherwise."""
    if path == "/hello":
        ok = isinstance(body, dict) and _valid_instance(body.get("instance"))
        port = body.get("port") if isinstance(body, dict) else None
        return 200 if ok and _is_int(port) and 1 <= port <= 65535 else 400  # type: ignore[operator]
    if path == "/bye":
        return 200 if isinstance(body, dict) and _valid_instance(body.get("instance")) else 400
    if not isinstance(body, list):
        return 400
    for op in body:
        if not isinstance(op, dict) or not _valid_instance(op.get("instance")):
            return 400
        value = op.get("value")
        seqno = op.get("seqno")
        if (
            op.get("op") not in ("add", "remove")
            or not isinstance(value, dict)
            or not _valid_filename(value.get("filename"))
            or not _is_int(seqno)
            or not 0 <= seqno <= U64_MAX  # type: ignore[operator]
        ):
            return 400
    return 200


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
instances = st.one_of(
    st.uuids().map(str), st.text(max_size=3), st.text(min_size=120, max_size=140), json_scalars
)
filenames = st.one_of(
    st.sampled_from(["a.txt", "", ".", "..", "a/b", "nul\0x", "🐱 b", "x" * 1025, "é" * 512]),
    st.text(max_size=12),
    json_scalars,
)


def hello_bodies(forbidden_ports: set[int]) -> st.SearchStrategy[object]:
    """Hello-shaped bodies, right or wrong in every field (never a live watcher's port)."""
    ports = st.one_of(st.integers(-5, 70_000), json_scalars).filter(
        lambda p: p not in forbidden_ports
    )
    return st.fixed_dictionaries(
        {"instance": instances, "port": ports}, optional={"host": json_scalars, "x": json_values}
    )


patch_ops = st.fixed_dictionaries(
    {
        "instance": instances,
        "op": st.one_of(st.sampled_from(["add", "remove", "modify", "ADD"]), json_scalars),
        "value": st.one_of(st.fixed_dictionaries({"filename": filenames}), json_values),
        "seqno": st.one_of(st.integers(-3, 2**65), json_scalars),
    },
)


@st.composite
def legacy_requests(draw: st.DrawFn, forbidden_ports: set[int]) -> tuple[str, bytes, object]:
    """(path, raw body, the parsed body or a marker) for one legacy request."""
    path = draw(st.sampled_from(["/hello", "/bye", "/files"]))
    shape = draw(st.sampled_from(["shaped", "shaped", "json", "bytes", "huge"]))
    if shape == "bytes":
        raw = draw(st.binary(max_size=60))
        try:
            return path, raw, json.loads(raw)
        except ValueError:
            return path, raw, _NOT_JSON
    if shape == "huge":
        size = draw(st.integers(MAX_BODY + 1, MAX_BODY * 3))
        return path, b"[" + b" " * size + b"]", _TOO_BIG
    if shape == "json":
        body = draw(json_values)
    elif path == "/hello":
        body = draw(hello_bodies(forbidden_ports))
    elif path == "/bye":
        body = draw(st.fixed_dictionaries({"instance": instances}))
    else:
        body = draw(st.lists(patch_ops, max_size=4))
    return path, json.dumps(body).encode(), body


_NOT_JSON, _TOO_BIG = object(), object()


def test_arbitrary_legacy_bodies_get_200_or_a_clear_4xx(env: Env) -> None:
    forbidden = {env.legacy_w.http_port, env.grpc_w.http_port}
    started = time.monotonic()
    headers = {"Content-Type": "application/json"}

    @SETTINGS
    @given(request=legacy_requests(forbidden))
    def run(request: tuple[str, bytes, object]) -> None:
        path, raw, body = request
        method = "PATCH" if path == "/files" else "POST"
        reply = env.agg.request(method, path, raw, headers)
        if body is _TOO_BIG:
            expected = 413
        elif body is _NOT_JSON:
            expected = 400
        else:
            expected = expected_legacy(path, body)
        env.count(f"legacy {reply.status}")
        assert reply.status == expected, (path, raw[:300], reply)
        if expected == 200:
            assert reply.json() == {"status": "ok"}
        else:
            assert reply.headers["content-type"].startswith("application/problem+json")
            problem = reply.json()
            assert problem["status"] == expected and problem["detail"], problem
        assert env.agg.proc.alive, env.agg.proc.log_text()[-3000:]

    run()
    measured("hypothesis: 100 legacy requests", time.monotonic() - started)
    assert env.good_lists_intact()


# ---------------------------------------------------------------- afterwards


def _nodes_in_metrics(text: str) -> set[str]:
    nodes = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "node" in sample.labels:
                nodes.add(sample.labels["node"])
    return nodes


def test_afterwards_the_aggregator_is_alive_undisturbed_and_nothing_leaked(env: Env) -> None:
    agg = env.agg
    assert agg.proc.alive
    assert env.good_lists_intact()
    # The good watchers were never cut off, kicked out or resynced.
    assert agg.proc.count("watcher_hello", node=GOOD) == 1
    assert agg.proc.count("legacy_hello_new", node=env.legacy_node) == 1
    assert env.grpc_w.proc.count("stream_failed") == 0
    assert env.grpc_w.proc.count("resync_requested") == 0
    assert env.legacy_w.proc.count("patch_rejected") == 0
    # ...and they still work.
    (env.grpc_w.folder / "after-the-storm.txt").write_text("a")
    (env.legacy_w.folder / "after-the-storm.txt").write_text("a")
    wait_for(env.good_lists_intact, SYNC_TIMEOUT, what="changes after the hostile input")

    # Everything the hostile peers created goes with the TTL: only the two good ones stay.
    wait_for(lambda: agg.healthz()["watchers"], TTL + 10, until=lambda n: n == 2, what="2 watchers")
    wait_for(
        lambda: _nodes_in_metrics(agg.metrics()),
        TTL + 5,
        until=lambda nodes: nodes <= {GOOD, env.legacy_node},
        what="the hostile peers' per-watcher metric series to be dropped",
    )
    errors = agg.metric("filewatch_ingestion_errors_total", kind="InvalidInputError")
    invalid = env.outcomes.get("sync INVALID_ARGUMENT", 0)
    assert errors >= invalid, (errors, env.outcomes)
    growth = (agg.proc.rss_kib() - env.rss_start_kib) / 1024
    measured("hostile input: aggregator RSS growth after the TTL", growth, "MiB")
    assert growth < 40, f"RSS grew by {growth:.1f} MiB"
    for outcome, n in sorted(env.outcomes.items()):
        measured(f"hostile outcome: {outcome}", n, "times")
