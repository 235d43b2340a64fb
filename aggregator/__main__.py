"""`python -m aggregator`: parse flags, move onto mimalloc, configure logging, serve."""

from __future__ import annotations

import asyncio
import os
import sys

import prometheus_client
import structlog

from aggregator.allocator import exec_with_mimalloc
from aggregator.config import from_args
from aggregator.memory import limit_malloc_arenas
from common.logs import configure


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code.

    Run as a command (`argv` None), it first re-executes itself on mimalloc
    (see `aggregator.allocator`) unless told `--allocator pymalloc`.
    """
    try:
        config = from_args(sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as err:
        print(f"aggregator: {err}", file=sys.stderr)
        return 2
    no_mimalloc = ""
    if config.allocator == "mimalloc":
        no_mimalloc = exec_with_mimalloc() if argv is None else "not run as a command"
    # Imported only now, on the allocator it will run on: gRPC, aiohttp and
    # OpenTelemetry take most of a second to import, which the re-exec would double.
    from aggregator.app import StartupError, run  # noqa: PLC0415

    # No *_created series: less noise per scrape.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    configure(config.log_level, config.log_format, service="aggregator", node="aggregator")
    if no_mimalloc:
        structlog.get_logger(__name__).warning("allocator_pymalloc", reason=no_mimalloc)
    if config.malloc_arenas:
        limit_malloc_arenas(config.malloc_arenas)  # before gRPC starts its threads
    try:
        asyncio.run(run(config))
    except StartupError as err:
        print(f"aggregator: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
