"""RFC 3339 times of mtimes, at the edges of what a file system can hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from aggregator.names import rfc3339

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def test_times_at_the_edges() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(1) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(-1) == "1969-12-31T23:59:59.999999Z"
    assert rfc3339(1_999_999_999) == "1970-01-01T00:00:01.999999Z"
    assert rfc3339(INT64_MIN) == "1677-09-21T00:12:43.145224Z"
    assert rfc3339(INT64_MAX) == "2262-04-11T23:47:16.854775Z"


@given(st.integers(INT64_MIN, INT64_MAX))
def test_a_time_is_its_mtime_truncated_to_the_microsecond(mtime_ns: int) -> None:
    text = rfc3339(mtime_ns)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed == EPOCH + timedelta(microseconds=mtime_ns // 1000)
