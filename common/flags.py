"""Command-line flags that each have an environment-variable twin."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "FILEWATCH_"


def env_name(flag: str) -> str:
    """The environment twin of a flag: --log-level -> FILEWATCH_LOG_LEVEL."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def add_flag(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    *names: str,
    help: str,
    default: Any,
    type: Callable[[str], Any] = str,
    **kwargs: Any,
) -> None:
    """Add a flag whose default comes from its env twin (named after the last name)."""
    twin = env_name(names[-1])
    raw = env.get(twin)
    if raw is not None:
        try:
            default = type(raw)
        except ValueError as exc:
            raise ValueError(f"{twin}={raw!r}: {exc}") from exc
    parser.add_argument(
        *names,
        type=type,
        default=default,
        help=f"{help} (env {twin}; default: %(default)s)",
        **kwargs,
    )


def add_config_flag(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    defaults: object,
    *names: str,
    help: str,
    **kwargs: Any,
) -> None:
    """Add a flag for a field of the dataclass instance `defaults` (`dest`, or the last name).

    The field gives the flag its default and, for an `int` or `float` field, its
    type; keyword arguments given here win.
    """
    field = kwargs.get("dest") or names[-1].lstrip("-").replace("-", "_")
    kind = typing.get_type_hints(type(defaults))[field]
    if kind in (int, float):
        kwargs.setdefault("type", kind)
    kwargs.setdefault("default", getattr(defaults, field))
    add_flag(parser, env, *names, help=help, **kwargs)
