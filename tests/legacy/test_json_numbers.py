"""Legacy bodies: an integer is a JSON number with an integral value, as JSON Schema has it.

`7` and `7.0` are the same JSON number, so a port or a seqno may be spelled
either way (the Go watcher spells integers plainly; a generic JSON client may
not). A fraction, a boolean, a string, or a value out of range is refused, and
so is a seqno past 2**64-1 however it is spelled.
"""

from __future__ import annotations

import pytest

from aggregator.errors import InvalidInputError
from aggregator.index import Op
from aggregator.legacy import LegacyOp
from aggregator.legacy_http import parse_hello, parse_list, parse_patch


def _patch(seqno: bytes) -> bytes:
    return b'[{"instance":"i","op":"add","value":{"filename":"a.txt"},"seqno":%b}]' % seqno


def test_a_port_is_a_whole_number_from_1_to_65535_however_spelled() -> None:
    for port, expected in ((b"4000", 4000), (b"4000.0", 4000), (b"4e3", 4000), (b"1.0", 1)):
        assert parse_hello(b'{"instance":"i","port":%b}' % port) == ("i", expected), port
    for port in (b"4000.5", b"0.0", b"65536.0", b"true", b'"4000"', b"1e300", b"null"):
        with pytest.raises(InvalidInputError, match="port"):
            parse_hello(b'{"instance":"i","port":%b}' % port)


def test_a_seqno_is_a_whole_number_from_0_to_2_64_less_1_however_spelled() -> None:
    for seqno, expected in (
        (b"2", 2),
        (b"2.0", 2),
        (b"0.0", 0),
        (b"-0.0", 0),
        (b"18446744073709551615", 2**64 - 1),
    ):
        assert parse_patch(_patch(seqno)) == [LegacyOp("i", Op.ADD, b"a.txt", expected)], seqno
    for seqno in (b"2.5", b"-1", b"-1.0", b"18446744073709551616", b"1.8446744073709552e19"):
        with pytest.raises(InvalidInputError, match="seqno"):
            parse_patch(_patch(seqno))


def test_a_listed_seqno_follows_the_same_rule() -> None:
    assert parse_list(b'{"instance":"i","files":[],"seqno":6.0}').seqno == 6
    with pytest.raises(InvalidInputError, match="seqno"):
        parse_list(b'{"instance":"i","files":[],"seqno":18446744073709551616}')
