"""Command-line flags that each have an environment-variable twin."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "FILEWATCH_"


CREDENTIAL_HELP = (
    "shared ingestion token; any local user can read a command line "
    "(/proc/PID/cmdline): prefer --token-file or the FILEWATCH_TOKEN variable"
)
CREDENTIAL_FILE_HELP = "file holding the shared ingestion token (surrounding whitespace ignored)"


def read_token_file(path: str) -> str:
    """The token in the file at `path`: its content, stripped of surrounding whitespace.

    Raises ValueError, one line naming the file, if it cannot be read, is empty,
    or holds more than one line of printable ASCII (all a token header can carry).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"--token-file {path!r}: cannot read it: {err.strerror or err}") from None
    token = raw.strip()
    if not token:
        raise ValueError(f"--token-file {path!r} is empty")
    if not all(0x20 <= b < 0x7F for b in token):
        raise ValueError(f"--token-file {path!r} must hold one line of printable ASCII (the token)")
    return token.decode("ascii")


def resolve_token(token: str, token_file: str) -> str:
    """The ingestion token: `token`, or what `token_file` holds; the two together are an error."""
    if not token_file:
        return token
    if token:
        raise ValueError(
            "give the token once: --token (FILEWATCH_TOKEN) and --token-file "
            "(FILEWATCH_TOKEN_FILE) exclude each other"
        )
    return read_token_file(token_file)


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
