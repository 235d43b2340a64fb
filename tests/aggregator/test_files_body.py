"""The `/files/` body cache: a body rebuilt from cached pages is the body built afresh."""

from __future__ import annotations

import json
import random

import pytest

from aggregator.http_gateway import FilesBodies
from aggregator.index import Index, Op, pack_meta


@pytest.mark.parametrize("detail", [False, True])
def test_a_body_rebuilt_after_changes_equals_one_built_afresh(detail: bool) -> None:
    rng = random.Random(7)
    index = Index()
    index.begin_snapshot("n", "e")
    index.extend_snapshot("n", ((b"f%05d" % i, pack_meta(i, i)) for i in range(0, 10_000, 2)))
    index.commit_snapshot("n", 1)
    assert len(index.pages()) > 2  # several pages: some cached, some fresh, below
    bodies = FilesBodies(index)
    first = bodies.get(detail).plain  # built with nothing cached
    assert len(json.loads(first)["files"]) == 5_000
    for sequence in range(2, 40):
        changes = [
            (rng.choice([Op.ADD, Op.REMOVE, Op.MODIFY]), b"f%05d" % rng.randrange(10_000), 0)
            for _ in range(rng.randrange(1, 30))
        ]
        index.apply_batch("n", "e", sequence, [(op, n, pack_meta(m, m)) for op, n, m in changes])
        rebuilt = bodies.get(detail).plain
        assert rebuilt == FilesBodies(index).get(detail).plain
        names = [e["filename"] for e in json.loads(rebuilt)["files"]]
        assert names == [e.filename for e in index.entries()]
