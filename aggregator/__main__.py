"""`python -m aggregator`: parse flags, configure logging, serve."""

from __future__ import annotations

import asyncio
import os
import sys

import prometheus_client

from aggregator.app import StartupError, run
from aggregator.config import from_args
from common.logs import configure


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        config = from_args(sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as err:
        print(f"aggregator: {err}", file=sys.stderr)
        return 2
    # No *_created series: less noise per scrape.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    configure(config.log_level, config.log_format, service="aggregator", node="aggregator")
    try:
        asyncio.run(run(config))
    except StartupError as err:
        print(f"aggregator: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
