"""HTTP adapter of the legacy protocol: `POST /hello`, `POST /bye`, `PATCH /files`.

Parses and validates the Go watcher's JSON byte for byte, answers
every well-formed request with exactly 200 and a small JSON body, and fetches
watcher lists with a timeout from the address a hello came from, never from
anywhere a body names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from yarl import URL

from aggregator.auth import check_bearer
from aggregator.errors import InvalidInputError, UnauthenticatedError
from aggregator.index import Op
from aggregator.legacy import LegacyIngest, LegacyList, LegacyOp, decode_filename
from aggregator.telemetry import Metrics

log = structlog.get_logger(__name__)

LEGACY: web.AppKey[LegacyIngest] = web.AppKey("legacy", LegacyIngest)
_LEGACY_OPS = {"add": Op.ADD, "remove": Op.REMOVE}
_MAX_INSTANCE = 128
_MAX_SEQNO = 2**64 - 1


def _integer(value: object) -> int | None:
    """An integer JSON number, or None: 7, and 7.0 too (the same number in JSON), not true."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _instance(obj: dict[str, Any], where: str) -> str:
    value = obj.get("instance")
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{where}: 'instance' must be a non-empty string")
    if len(value) > _MAX_INSTANCE:
        raise InvalidInputError(f"{where}: 'instance' longer than {_MAX_INSTANCE} characters")
    return value


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json(body: bytes) -> object:
    """Parse a JSON body. Lone surrogates (\\udc80.. escapes of undecodable bytes) are
    valid JSON that orjson refuses: such a body is parsed again by the standard library."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise InvalidInputError(f"malformed JSON: {exc}") from exc
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except ValueError:
            raise InvalidInputError(f"malformed JSON: {exc}") from exc


def parse_hello(body: bytes) -> tuple[str, int]:
    """`{"instance":"<uuid>","port":4000}` -> (instance, port)."""
    obj = _json(body)
    if not isinstance(obj, dict):
        raise InvalidInputError("hello: body must be a JSON object")
    instance = _instance(obj, "hello")
    port = _integer(obj.get("port"))
    if port is None or not 1 <= port <= 65535:
        raise InvalidInputError("hello: 'port' must be an integer from 1 to 65535")
    return instance, port


def parse_bye(body: bytes) -> str:
    """`{"instance":"<uuid>"}` -> instance."""
    obj = _json(body)
    if not isinstance(obj, dict):
        raise InvalidInputError("bye: body must be a JSON object")
    return _instance(obj, "bye")


def parse_patch(body: bytes) -> list[LegacyOp]:
    """`[{"instance":..,"op":"add","value":{"filename":..},"seqno":7}, ...]`, all or nothing."""
    arr = _json(body)
    if not isinstance(arr, list):
        raise InvalidInputError("patch: body must be a JSON array of operations")
    ops = []
    for i, item in enumerate(arr):
        where = f"patch[{i}]"
        if not isinstance(item, dict):
            raise InvalidInputError(f"{where}: each operation must be a JSON object")
        instance = _instance(item, where)
        raw_op = item.get("op")
        op = _LEGACY_OPS.get(raw_op) if isinstance(raw_op, str) else None
        if op is None:
            raise InvalidInputError(
                f'{where}: \'op\' must be "add" or "remove", got {item.get("op")!r}'
            )
        value = item.get("value")
        if not isinstance(value, dict) or not isinstance(value.get("filename"), str):
            raise InvalidInputError(f"{where}: 'value' must be an object with a string 'filename'")
        try:
            name = decode_filename(value["filename"])
        except InvalidInputError as err:
            raise InvalidInputError(f"{where}: {err}") from err
        seqno = _integer(item.get("seqno"))
        if seqno is None or not 0 <= seqno <= _MAX_SEQNO:
            raise InvalidInputError(f"{where}: 'seqno' must be an integer from 0 to 2**64-1")
        ops.append(LegacyOp(instance, op, name, seqno))
    return ops


def parse_list(body: bytes, metrics: Metrics | None = None) -> LegacyList:
    """A watcher's `GET /files` answer; entries with impossible names are skipped."""
    obj = _json(body)
    if not isinstance(obj, dict):
        raise InvalidInputError("list: body must be a JSON object")
    instance = _instance(obj, "list")
    seqno = _integer(obj.get("seqno"))
    if seqno is None or not 0 <= seqno <= _MAX_SEQNO:
        raise InvalidInputError("list: 'seqno' must be an integer from 0 to 2**64-1")
    files = obj.get("files")
    if files is None:
        files = []  # a Go nil slice encodes as null
    if not isinstance(files, list):
        raise InvalidInputError("list: 'files' must be an array")
    names = []
    for entry in files:
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(filename, str):
            raise InvalidInputError("list: each file must be an object with a string 'filename'")
        try:
            names.append(decode_filename(filename))
        except InvalidInputError:
            if metrics is not None:
                metrics.errors.labels("legacy_list_bad_name").inc()
    return LegacyList(instance, tuple(names), seqno)


class ListFetcher:
    """Fetches `GET http://HOST:PORT/files` with a timeout and a size cap.

    At most `max_fetches` run at once (the others wait their turn), and each
    stops reading at `max_bytes`: the bodies in memory never exceed their product,
    whatever a peer announces or streams.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: float,
        max_bytes: int,
        max_fetches: int,
        metrics: Metrics,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._slots = asyncio.Semaphore(max_fetches)
        self._metrics = metrics

    async def __call__(self, host: str, port: int) -> LegacyList:
        async with self._slots:
            body = await self._get(URL.build(scheme="http", host=host, port=port, path="/files"))
        return parse_list(body, self._metrics)

    async def _get(self, url: URL) -> bytes:
        too_large = f"GET {url} answered more than {self._max_bytes} bytes (--max-list-bytes)"
        async with self._session.get(url, timeout=self._timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise InvalidInputError(f"GET {url} answered {resp.status}")
            if (resp.content_length or 0) > self._max_bytes:
                raise InvalidInputError(too_large)
            chunks, size = [], 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > self._max_bytes:
                    raise InvalidInputError(too_large)
                chunks.append(chunk)
        return b"".join(chunks)


class LegacyGuard:
    """Who may use the legacy endpoints: the token holder, or token-less peers in named networks."""

    def __init__(self, token: str, networks: Sequence[str]) -> None:
        self._token = token
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def check(self, request: web.Request) -> None:
        """Raise UnauthenticatedError unless the request may ingest."""
        auth = request.headers.get("Authorization")
        if auth is not None and self._token:
            check_bearer(self._token, auth)  # the same check as the gRPC side's
            return
        try:
            peer = ipaddress.ip_address((request.remote or "").split("%")[0])
        except ValueError as exc:
            raise UnauthenticatedError("unknown peer address") from exc
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
            peer = peer.ipv4_mapped  # an IPv4 client of a dual-stack listener
        if not any(peer in net for net in self._networks):
            allowed = ", ".join(map(str, self._networks))
            raise UnauthenticatedError(
                f"without a token, legacy requests are accepted only from {allowed}"
            )


GUARD: web.AppKey[LegacyGuard] = web.AppKey("legacy_guard", LegacyGuard)


def _ok() -> web.Response:
    # Exactly 200: the Go watcher logs 201 and 204 as errors.
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def _body(request: web.Request) -> bytes:
    request.app[GUARD].check(request)
    return await request.read()


async def post_hello(request: web.Request) -> web.Response:
    """POST /hello: register the instance; its list is fetched from the peer's address."""
    instance, port = parse_hello(await _body(request))
    host = request.remote
    if not host:
        raise InvalidInputError("hello: the peer address is unknown")
    request.app[LEGACY].hello(instance, host, port)
    return _ok()


async def post_bye(request: web.Request) -> web.Response:
    """POST /bye: the instance's files go at once."""
    request.app[LEGACY].bye(parse_bye(await _body(request)), request.remote or "")
    return _ok()


async def patch_files(request: web.Request) -> web.Response:
    """PATCH /files: one or more add/remove operations, each with its seqno."""
    ops = parse_patch(await _body(request))
    # Our Python watcher carries its batch span; the Go watcher sends none.
    request.app[LEGACY].patch(ops, request.remote or "", request.headers.get("traceparent", ""))
    return _ok()


def add_routes(app: web.Application, legacy: LegacyIngest, guard: LegacyGuard) -> None:
    """Mount the legacy endpoints (exact paths; never redirected)."""
    app[LEGACY] = legacy
    app[GUARD] = guard
    for path in ("/hello", "/hello/"):
        app.router.add_post(path, post_hello)
    for path in ("/bye", "/bye/"):
        app.router.add_post(path, post_bye)
    for path in ("/files", "/files/"):
        app.router.add_patch(path, patch_files)
