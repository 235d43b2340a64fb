"""The lag floor: one process, inotify read in its event loop, a sorted list, aiohttp /files/.

    python bench/lag_floor.py --dir FOLDER [--http 127.0.0.1:0]

The least a Python pipeline from a folder to `GET /files/` can do on this
machine: no watchdog thread, no watcher process, no wire protocol, no index.
An inotify descriptor (libc's inotify_init1 / inotify_add_watch through
ctypes) is read by `loop.add_reader` in the same asyncio loop that serves
aiohttp; each event is applied at once to a sorted list of the folder's
names (bisect), and the body `{"files":[{"filename":...},...]}` is encoded
(orjson) at most once per version of that list and served with an ETag
(`If-None-Match` -> 304), as the aggregator serves it. Only what the bench
measures is here: files created, deleted and moved in or out of one folder
(no subfolders, no stats), and `PATCH /files`, parsed and answered 200. Logs
one JSON line `{"event": "lag_floor_started", "http": "HOST:PORT", "files": N}`
when it serves; SIGTERM or SIGINT stops it.
Bench code, not product code: it exists to be compared with.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, our folder would come first on sys.path: nothing of bench/ is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import bisect  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402

import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_MOVED_FROM = 0x0000_0040
IN_MOVED_TO = 0x0000_0080
IN_CREATE = 0x0000_0100
IN_DELETE = 0x0000_0200
IN_DELETE_SELF = 0x0000_0400
IN_MOVE_SELF = 0x0000_0800
IN_Q_OVERFLOW = 0x0000_4000
IN_IGNORED = 0x0000_8000
IN_ONLYDIR = 0x0100_0000
IN_ISDIR = 0x4000_0000
WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name[len]
READ_SIZE = 256 * 1024
ADDED = IN_CREATE | IN_MOVED_TO
REMOVED = IN_DELETE | IN_MOVED_FROM


class Inotify:
    """One inotify descriptor (non-blocking) watching one folder's entries."""

    def __init__(self, folder: str) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        init1 = libc.inotify_init1
        init1.argtypes = [ctypes.c_int]
        init1.restype = ctypes.c_int
        add_watch = libc.inotify_add_watch
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add_watch.restype = ctypes.c_int
        fd = init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        wd = add_watch(fd, os.fsencode(folder), WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")

    def read(self) -> list[tuple[int, bytes]]:
        """Every event queued now, as (mask, name); [] when none is."""
        out: list[tuple[int, bytes]] = []
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return out
            offset, end = 0, len(data)
            while offset < end:
                _, mask, _, size = EVENT.unpack_from(data, offset)
                offset += EVENT.size
                out.append((mask, data[offset : offset + size].rstrip(b"\0")))
                offset += size

    def close(self) -> None:
        """Close the descriptor (its watch goes with it)."""
        os.close(self.fd)


class Listing:
    """The folder's names, sorted, with a version bumped on each change and its encoded body."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.names: list[str] = []
        self.version = 0
        self._boot = secrets.token_hex(4)
        self._body: tuple[int, bytes, str] = (-1, b"", "")
        self.rescan()

    def rescan(self) -> None:
        """Read the folder again (at start, and after an inotify queue overflow)."""
        with os.scandir(self.folder) as entries:
            self.names = sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        self.version += 1

    def apply(self, events: list[tuple[int, bytes]]) -> None:
        """Apply inotify events to the list."""
        names = self.names
        for mask, raw in events:
            if mask & IN_Q_OVERFLOW:
                self.rescan()
                continue
            if mask & IN_ISDIR or not raw:
                continue
            name = os.fsdecode(raw)
            i = bisect.bisect_left(names, name)
            present = i < len(names) and names[i] == name
            if mask & ADDED and not present:
                names.insert(i, name)
                self.version += 1
            elif mask & REMOVED and present:
                del names[i]
                self.version += 1

    def body(self) -> tuple[bytes, str]:
        """The `/files/` body of the current version and its ETag, encoded at most once."""
        version, plain, etag = self._body
        if version != self.version:
            entries = [{"filename": n} for n in self.names]
            try:
                plain = orjson.dumps({"files": entries})
            except orjson.JSONEncodeError:  # undecodable bytes: lone surrogates, escaped
                plain = json.dumps({"files": entries}, separators=(",", ":")).encode()
            etag = f'"{self._boot}-{self.version}"'
            self._body = (self.version, plain, etag)
        return plain, etag


LISTING: web.AppKey[Listing] = web.AppKey("listing", Listing)


async def get_files(request: web.Request) -> web.Response:
    """GET /files/: the folder's names, sorted; 304 when If-None-Match holds the ETag."""
    plain, etag = request.app[LISTING].body()
    headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=plain, headers=headers, content_type="application/json", charset="utf-8"
    )


async def patch_files(request: web.Request) -> web.Response:
    """PATCH /files: the body parsed as JSON, then 200, nothing applied.

    The least a Python HTTP server does per legacy PATCH: the reference for the
    aggregator's CPU per PATCH (lag_legacy).
    """
    orjson.loads(await request.read())
    return web.Response()


async def get_healthz(request: web.Request) -> web.Response:
    """GET /healthz: {"status": "ok", "files": N}."""
    count = len(request.app[LISTING].names)
    return web.Response(body=orjson.dumps({"status": "ok", "files": count}))


async def serve(folder: str, host: str, port: int) -> None:
    """Watch `folder`, serve its list on host:port, until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    inotify = Inotify(folder)  # the watch first, then the listing: no change falls between
    listing = Listing(folder)
    loop.add_reader(inotify.fd, lambda: listing.apply(inotify.read()))
    app = web.Application()
    app[LISTING] = listing
    app.router.add_get("/files/", get_files)
    app.router.add_get("/files", get_files)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_patch("/files", patch_files)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        started = {"event": "lag_floor_started", "http": f"{host}:{runner.addresses[-1][1]}"}
        print(json.dumps({**started, "files": len(listing.names)}), flush=True)
        await stop.wait()
    finally:
        loop.remove_reader(inotify.fd)
        inotify.close()
        await runner.cleanup()


def main() -> int:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", required=True, help="the folder to watch")
    parser.add_argument("--http", default="127.0.0.1:0", help="HOST:PORT to serve on")
    ns = parser.parse_args()
    host, _, port = ns.http.rpartition(":")
    asyncio.run(serve(ns.dir, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
