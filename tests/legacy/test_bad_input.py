"""Bad input on the legacy endpoints: a clear 400/413 and nothing changed.

One aggregator (--max-body-bytes 1024) with one live Python watcher in http://
mode on folder1 is shared by the table-driven cases. Every bad PATCH names that
live instance and would remove cats.txt (seqno 2, the next one) were it accepted,
so a case that slipped through would show in the list, which must stay
byte-identical. Token and network guards get aggregators of their own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from tests.legacy.conftest import (
    SYNC_TIMEOUT,
    AggregatorFactory,
    AggregatorProc,
    FakeGoFactory,
    Processes,
    WatcherProc,
    async_request,
    copy_samples,
    files_body,
    node_files,
)
from tests.support import HOST, Reply, http_request, wait_for, wait_for_async

MAX_BODY = 1024
TOKEN = "s3cret"  # noqa: S105 - the test's own shared token
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Live:
    """The shared aggregator and the live watcher whose files are the baseline."""

    agg: AggregatorProc
    watcher: WatcherProc


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """An aggregator (--max-body-bytes 1024) listing folder1 from a legacy watcher."""
    base = tmp_path_factory.mktemp("legacy-bad-input")
    p = Processes(base / "logs")
    try:
        agg = p.start_aggregator("--max-body-bytes", str(MAX_BODY))
        folders = copy_samples(base / "data")
        w = p.start_watcher(folders.folder1, f"http://{HOST}:{agg.http_port}")
        wait_for(
            lambda: node_files(agg.http_port, w.node),
            SYNC_TIMEOUT,
            until=lambda names: names == ["cats.txt", "dogs.txt"],
            what="the baseline list",
        )
        yield Live(agg, w)
    finally:
        p.stop_all()


# ---------------------------------------------------------------- the table

_MISSING = object()
"""Marks a field to leave out of a body."""

Body = Callable[[str], bytes]
"""Builds a request body from the live watcher's instance."""


def _dump(value: object) -> bytes:
    return orjson.dumps(value)


def _raw(data: bytes) -> Body:
    return lambda _instance: data


def _hello(**fields: object) -> Body:
    def build(_instance: str) -> bytes:
        body: dict[str, object] = {"instance": str(uuid.uuid4()), "port": 4000}
        body.update(fields)
        return _dump({k: v for k, v in body.items() if v is not _MISSING})

    return build


def _bye(**fields: object) -> Body:
    def build(instance: str) -> bytes:
        body: dict[str, object] = {"instance": instance}
        body.update(fields)
        return _dump({k: v for k, v in body.items() if v is not _MISSING})

    return build


def _op(instance: str, fields: dict[str, object]) -> dict[str, object]:
    op: dict[str, object] = {
        "instance": instance,
        "op": "remove",
        "value": {"filename": "cats.txt"},
        "seqno": 2,
    }
    op.update(fields)
    return {k: v for k, v in op.items() if v is not _MISSING}


def _patch(**fields: object) -> Body:
    """A one-op PATCH removing cats.txt at the live instance's next seqno, but for `fields`."""
    return lambda instance: _dump([_op(instance, fields)])


def _name(filename: object) -> Body:
    return _patch(value={"filename": filename})


@dataclass(frozen=True)
class Case:
    """One bad request and what the answer must say."""

    id: str
    method: str
    path: str
    body: Body
    status: int
    words: tuple[str, ...]
    """Each must appear (case-insensitively) in the problem's detail."""


def _hello_case(case_id: str, body: Body, *words: str) -> Case:
    return Case(f"hello-{case_id}", "POST", "/hello", body, 400, words)


def _bye_case(case_id: str, body: Body, *words: str) -> Case:
    return Case(f"bye-{case_id}", "POST", "/bye", body, 400, words)


def _patch_case(case_id: str, body: Body, *words: str) -> Case:
    return Case(f"patch-{case_id}", "PATCH", "/files", body, 400, words)


_PAD = "x" * (2 * MAX_BODY)

CASES = [
    # malformed JSON
    _hello_case("truncated-json", _raw(b'{"instance":"i","port":'), "json"),
    _hello_case("trailing-garbage", _raw(b'{"instance":"i","port":4000} x'), "json"),
    _bye_case("truncated-json", _raw(b'{"instance":'), "json"),
    _patch_case("truncated-json", _raw(b'[{"instance":"i","op":"add"'), "json"),
    _patch_case("empty-body", _raw(b""), "json"),
    _patch_case("not-utf8", _raw(b'[{"instance":"\xff\xfe","op":"add"}]'), "json"),
    _patch_case("single-quotes", _raw(b"[{'instance':'i'}]"), "json"),
    _patch_case(
        "lone-surrogate", lambda i: _name("x")(i).replace(b'"x"', b'"\\ud800"'), "surrogate"
    ),
    # JSON of the wrong shape
    _patch_case("object-not-array", lambda i: _dump(_op(i, {})), "array"),
    _patch_case("null", _raw(b"null"), "array"),
    _patch_case("array-of-numbers", _raw(b"[1]"), "object"),
    _patch_case("array-of-arrays", lambda i: _dump([[_op(i, {})]]), "object"),
    _hello_case("array-not-object", lambda _: _dump([{"instance": "i", "port": 4000}]), "object"),
    _hello_case("string", _raw(b'"hello"'), "object"),
    _bye_case("array-not-object", lambda i: _dump([{"instance": i}]), "object"),
    # hello: port
    _hello_case("port-string", _hello(port="4000"), "port"),
    _hello_case("port-0", _hello(port=0), "port"),
    _hello_case("port-70000", _hello(port=70000), "port"),
    _hello_case("port-negative", _hello(port=-1), "port"),
    _hello_case("port-true", _hello(port=True), "port"),
    _hello_case("port-float", _hello(port=4000.5), "port"),
    _hello_case("port-null", _hello(port=None), "port"),
    _hello_case("port-missing", _hello(port=_MISSING), "port"),
    # instance, on every endpoint
    _hello_case("instance-missing", _hello(instance=_MISSING), "instance"),
    _hello_case("instance-empty", _hello(instance=""), "instance"),
    _hello_case("instance-number", _hello(instance=42), "instance"),
    _hello_case("instance-too-long", _hello(instance="i" * 129), "instance"),
    _bye_case("instance-missing", _bye(instance=_MISSING), "instance"),
    _bye_case("instance-empty", _bye(instance=""), "instance"),
    _bye_case("instance-number", _bye(instance=42), "instance"),
    _bye_case("instance-null", _bye(instance=None), "instance"),
    _patch_case("instance-missing", _patch(instance=_MISSING), "instance"),
    _patch_case("instance-empty", _patch(instance=""), "instance"),
    _patch_case("instance-number", _patch(instance=42), "instance"),
    # seqno
    _patch_case("seqno-negative", _patch(seqno=-1), "seqno"),
    _patch_case("seqno-float", _patch(seqno=1.5), "seqno"),
    _patch_case("seqno-string", _patch(seqno="3"), "seqno"),
    _patch_case("seqno-true", _patch(seqno=True), "seqno"),
    _patch_case("seqno-null", _patch(seqno=None), "seqno"),
    _patch_case("seqno-missing", _patch(seqno=_MISSING), "seqno"),
    # op
    _patch_case("op-unknown", _patch(op="modify"), "op"),
    _patch_case("op-upper-case", _patch(op="REMOVE"), "op"),
    _patch_case("op-missing", _patch(op=_MISSING), "op"),
    _patch_case("op-null", _patch(op=None), "op"),
    _patch_case("op-number", _patch(op=1), "op"),
    _patch_case("op-list", _patch(op=["remove"]), "op"),
    _patch_case("op-object", _patch(op={"remove": True}), "op"),
    # value and filename
    _patch_case("value-missing", _patch(value=_MISSING), "value"),
    _patch_case("value-string", _patch(value="cats.txt"), "value"),
    _patch_case("value-null", _patch(value=None), "value"),
    _patch_case("filename-missing", _patch(value={"name": "cats.txt"}), "filename"),
    _patch_case("filename-number", _name(7), "filename"),
    _patch_case("filename-null", _name(None), "filename"),
    _patch_case("filename-list", _name(["cats.txt"]), "filename"),
    _patch_case("filename-slash", _name("sub/cats.txt"), "filename", "/"),
    _patch_case("filename-parent-path", _name("../cats.txt"), "filename", "/"),
    _patch_case("filename-nul", _name("cats\u0000.txt"), "filename", "nul"),
    _patch_case("filename-dot", _name("."), "filename"),
    _patch_case("filename-dotdot", _name(".."), "filename"),
    _patch_case("filename-empty", _name(""), "filename"),
    # all or nothing: a valid op before a bad one is not applied either
    _patch_case(
        "second-op-bad",
        lambda i: _dump([_op(i, {}), _op(i, {"seqno": "3", "value": {"filename": "dogs.txt"}})]),
        "patch[1]",
        "seqno",
    ),
    # bodies over --max-body-bytes
    Case("hello-too-large", "POST", "/hello", _hello(pad=_PAD), 413, ("size",)),
    Case("bye-too-large", "POST", "/bye", _bye(pad=_PAD), 413, ("size",)),
    Case(
        "patch-too-large",
        "PATCH",
        "/files",
        lambda i: _dump([_op(i, {"seqno": 2 + n}) for n in range(40)]),
        413,
        ("size",),
    ),
]


def _state(port: int) -> tuple[bytes, bytes]:
    return files_body(port), files_body(port, detail=True)


def assert_problem(reply: Reply, status: int, words: tuple[str, ...]) -> dict[str, Any]:
    """A problem+json answer with `status` whose detail holds every word."""
    assert reply.status == status, reply
    assert reply.content_type == "application/problem+json", reply
    problem: dict[str, Any] = reply.json()
    assert problem["status"] == status
    detail = problem["detail"]
    assert isinstance(detail, str), problem
    for word in words:
        assert word.lower() in detail.lower(), f"{word!r} not in detail {detail!r}"
    return problem


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(live: Live, case: Case) -> None:
    port = live.agg.http_port
    body = case.body(live.watcher.instance)
    if case.status == 413:
        assert len(body) > MAX_BODY
    else:
        assert len(body) <= MAX_BODY
    before = _state(port)
    reply = http_request(port, case.method, case.path, body, JSON_HEADERS)
    assert_problem(reply, case.status, case.words)
    assert _state(port) == before  # byte-identical, the detail view's version too


def test_the_baseline_still_moves_after_the_bad_input(live: Live) -> None:
    """The live watcher was never disturbed: its next real change still applies."""
    folder = live.watcher.folder
    (folder / "after-bad-input.txt").write_text("still in sync")
    wait_for(
        lambda: node_files(live.agg.http_port, live.watcher.node),
        SYNC_TIMEOUT,
        until=lambda names: names == ["after-bad-input.txt", "cats.txt", "dogs.txt"],
        what="the watcher's next change",
    )
    (folder / "after-bad-input.txt").unlink()
    wait_for(
        lambda: node_files(live.agg.http_port, live.watcher.node),
        SYNC_TIMEOUT,
        until=lambda names: names == ["cats.txt", "dogs.txt"],
        what="the watcher's removal",
    )


def _metric(port: int, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels`."""
    text = http_request(port, "GET", "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


def test_bad_input_is_logged_and_counted(live: Live) -> None:
    port = live.agg.http_port
    rejected = _metric(port, "filewatch_rejected_inputs_total", endpoint="/hello")
    answered = _metric(port, "filewatch_http_requests_total", route="/hello", status="400")
    logged = len(live.agg.proc.events("http_rejected"))
    reply = http_request(port, "POST", "/hello", b'{"instance":"i","port":"x"}', JSON_HEADERS)
    assert_problem(reply, 400, ("port",))
    wait_for(
        lambda: len(live.agg.proc.events("http_rejected")),
        SYNC_TIMEOUT,
        until=lambda n: n == logged + 1,
        what="the rejection to be logged",
    )
    assert _metric(port, "filewatch_http_requests_total", route="/hello", status="400") == (
        answered + 1
    )
    # The metric of refused inputs counts every bad input, not only oversized ones.
    assert _metric(port, "filewatch_rejected_inputs_total", endpoint="/hello") == rejected + 1


# ---------------------------------------------------------------- token and networks


async def test_wrong_token_is_refused_and_the_right_one_accepted(
    start_aggregator: AggregatorFactory,
    fake_go: FakeGoFactory,
    session: aiohttp.ClientSession,
) -> None:
    agg = start_aggregator("--token", TOKEN)
    fake = await fake_go(agg.http_port, ["a.txt"], token=TOKEN)
    assert (await fake.hello()).status == 200
    listed = fake.listed
    await wait_for_async(listed, SYNC_TIMEOUT, until=lambda n: n == ["a.txt"], what="the list")
    base = f"http://{HOST}:{agg.http_port}"
    before = await async_request(session, "GET", f"{base}/files/?detail=1")
    op = fake.change("add", "b.txt")
    for method, path, body in [
        ("PATCH", "/files", orjson.dumps([op])),
        ("POST", "/hello", orjson.dumps({"instance": fake.instance, "port": fake.port})),
        ("POST", "/bye", orjson.dumps({"instance": fake.instance})),
    ]:
        wrong = await async_request(
            session,
            method,
            f"{base}{path}",
            body,
            {"Content-Type": "application/json", "Authorization": "Bearer nope"},
        )
        assert_problem(wrong, 401, ("token",))
    after = await async_request(session, "GET", f"{base}/files/?detail=1")
    assert after.body == before.body
    assert (await fake.patch(op)).status == 200  # the right token
    await wait_for_async(
        listed, SYNC_TIMEOUT, until=lambda n: n == ["a.txt", "b.txt"], what="the change"
    )


async def test_token_less_requests_outside_the_legacy_networks_are_refused(
    start_aggregator: AggregatorFactory, session: aiohttp.ClientSession
) -> None:
    agg = start_aggregator("--legacy-networks", "10.0.0.0/8")
    base = f"http://{HOST}:{agg.http_port}"
    instance = str(uuid.uuid4())
    before = await async_request(session, "GET", f"{base}/files/?detail=1")
    for method, path, body in [
        ("POST", "/hello", orjson.dumps({"instance": instance, "port": 4000})),
        (
            "PATCH",
            "/files",
            orjson.dumps(
                [{"instance": instance, "op": "add", "value": {"filename": "a"}, "seqno": 2}]
            ),
        ),
        ("POST", "/bye", orjson.dumps({"instance": instance})),
    ]:
        reply = await async_request(session, method, f"{base}{path}", body, JSON_HEADERS)
        assert_problem(reply, 401, ("token", "10.0.0.0/8"))
    after = await async_request(session, "GET", f"{base}/files/?detail=1")
    assert after.status == 200  # the read API stays open
    assert after.body == before.body
    assert (await async_request(session, "GET", f"{base}/healthz")).status == 200
