"""Our legacy watcher keeps apart names that differ only in undecodable bytes.

A real `python -m watcher -aggregator=http://...` against a fake aggregator
(tests.faults.fake_aggregator) that records the PATCH bodies as they came; its
own `GET /files` read raw. Each undecodable byte 0xXY travels as the escape
\\udcXY (the name's surrogateescape decoding), never as U+FFFD.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import SYNC_TIMEOUT, WatcherFactory
from tests.faults.fake_aggregator import FakeLegacyAggregator, fake_legacy_aggregator
from tests.support import http_request, wait_for

ODD = (b"caf\xff.x", b"caf\xfe.x")


@pytest.fixture
def fake() -> Iterator[FakeLegacyAggregator]:
    """A fake legacy aggregator (set up before the watchers, so closed after them)."""
    with fake_legacy_aggregator() as agg:
        yield agg


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _ops(fake: FakeLegacyAggregator, op: str) -> list[dict[str, Any]]:
    return [o for o in fake.patched_ops() if o["op"] == op]


@pytest.mark.timeout(60)
def test_names_differing_only_in_undecodable_bytes_stay_two_in_patches_and_the_list(
    fake: FakeLegacyAggregator, start_watcher: WatcherFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "plain.txt").write_text("a")
    raw_folder = os.fsencode(folder)
    with open(os.path.join(raw_folder, b"\xe9t\xe9.x"), "wb") as f:  # in the first scan
        f.write(b"latin-1")
    w = start_watcher(folder, fake.url)
    for raw in ODD:
        with open(os.path.join(raw_folder, raw), "wb") as f:
            f.write(raw)

    adds = wait_for(
        lambda: _ops(fake, "add"), SYNC_TIMEOUT, until=lambda ops: len(ops) >= 2, what="2 adds"
    )
    assert sorted(_raw(o["value"]["filename"]) for o in adds) == sorted(ODD), adds
    bodies = b"".join(r.body for r in fake.requests("PATCH", "/files"))
    assert b'"caf\\udcff.x"' in bodies and b'"caf\\udcfe.x"' in bodies, bodies
    assert "\ufffd".encode() not in bodies and b"\\ufffd" not in bodies, bodies

    listing = http_request(w.http_port, "GET", "/files")
    assert listing.status == 200 and listing.content_type == "application/json"
    assert b'"caf\\udcff.x"' in listing.body and b'"caf\\udcfe.x"' in listing.body
    assert b'"\\udce9t\\udce9.x"' in listing.body, listing.body
    listed = {f["filename"] for f in json.loads(listing.body)["files"]}
    assert {_raw(n) for n in listed} == {b"plain.txt", b"\xe9t\xe9.x", *ODD}
    # The list and the PATCHes name each file identically.
    assert {o["value"]["filename"] for o in adds} <= listed

    os.unlink(os.path.join(raw_folder, ODD[0]))
    removes = wait_for(
        lambda: _ops(fake, "remove"), SYNC_TIMEOUT, until=bool, what="the remove of one of them"
    )
    assert [_raw(o["value"]["filename"]) for o in removes] == [ODD[0]]
    listed_after = {
        _raw(f["filename"])
        for f in json.loads(http_request(w.http_port, "GET", "/files").body)["files"]
    }
    assert listed_after == {b"plain.txt", b"\xe9t\xe9.x", ODD[1]}
