"""JSON as our watcher writes it on the legacy protocol: names kept apart, orjson when it can.

The Go watcher sends U+FFFD for every byte of a name that is not UTF-8, so two
names that differ only there arrive as one. Ours sends the name's
surrogateescape decoding instead: each undecodable byte 0xXY becomes the lone
surrogate U+DCXY, which JSON writes as the escape `\\udcXY` (for b"caf\\xff.x":
"caf\\udcff.x"). An aggregator that knows the convention gets the exact bytes
back; a Go one decodes each such escape as U+FFFD, just what the Go watcher
would have sent. The same names go in PATCH bodies and in `GET /files`, so the
list and the changes name each file identically.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def legacy_name(raw: bytes) -> str:
    """A file name for the legacy protocol: UTF-8, undecodable bytes as U+DC80..U+DCFF."""
    return raw.decode("utf-8", "surrogateescape")


def dumps(obj: Any) -> bytes:
    """`obj` as compact JSON, lone surrogates written as `\\udcXY` escapes."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        # orjson refuses lone surrogates (an undecodable name's bytes); the
        # standard library writes them as escapes, and everything else as ASCII.
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
