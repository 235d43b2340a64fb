"""File names: raw bytes on the wire, a lossless display string for readers.

A name that is valid UTF-8 is shown as it is. Bytes that are not valid UTF-8
are shown as the lone surrogates U+DC80..U+DCFF (Python's "surrogateescape",
PEP 383): in JSON they appear as the escapes "\\udc80".."\\udcff", and
`os.fsencode(name)` (or `name.encode("utf-8", "surrogateescape")`) gives back
the exact bytes.
"""

from __future__ import annotations

import functools
import time


def display_name(raw: bytes) -> str:
    """The display form of a raw file name (lossless)."""
    return raw.decode("utf-8", "surrogateescape")


def raw_name(display: str) -> bytes:
    """The raw bytes of a display name (inverse of `display_name`)."""
    return display.encode("utf-8", "surrogateescape")


def invalid_name_reason(raw: bytes) -> str | None:
    """Why a name cannot be a file name directly in a folder, or None if it can."""
    if not raw:
        return "empty filename"
    if b"/" in raw:
        return "filename contains '/'"
    if b"\x00" in raw:
        return "filename contains NUL"
    if raw in (b".", b".."):
        return "filename is '.' or '..'"
    if len(raw) > 1024:
        return "filename longer than 1024 bytes"
    return None


def rfc3339(mtime_ns: int) -> str:
    """An mtime (ns since the epoch) in RFC 3339, UTC, to the microsecond (truncated)."""
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{ns // 1000:06d}Z"


@functools.lru_cache(maxsize=1024)
def _utc_second(seconds: int) -> str:
    """The date and time of a second since the epoch; files changed together share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
