"""Structured logging, configured once by each service's `__main__`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: str, fmt: str, **static: Any) -> None:
    """One line per event, key=value or JSON; `static` fields go on every line.

    `fmt` is "kv", "json", or "auto" (JSON when stderr is not a terminal).
    Standard-library records (grpc, aiohttp, asyncio) pass through the same
    renderer.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    )

    def add_static(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in static.items():
            event.setdefault(key, value)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_static,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a second line per request; we log our own.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
