"""A config flag takes its default and type from its dataclass field; env twins override."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from common.flags import add_config_flag


@dataclass(frozen=True)
class _Config:
    delay: float = 5  # an int literal: the annotation, not the value, sets the type
    count: int = 3
    label: str = "x"
    port: int = 4000


def _parser(env: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    d = _Config()
    add_config_flag(p, env, d, "--delay", help="seconds")
    add_config_flag(p, env, d, "--count", help="how many")
    add_config_flag(p, env, d, "--label", help="a name", choices=["x", "y"])
    add_config_flag(p, env, d, "-p", "--p", help="a port", dest="port")
    return p


def test_defaults_and_types_come_from_the_fields() -> None:
    ns = _parser({}).parse_args([])
    assert (ns.delay, ns.count, ns.label, ns.port) == (5, 3, "x", 4000)
    ns = _parser({}).parse_args(["--delay", "0.25", "--count", "7", "--label", "y", "-p", "1"])
    assert (ns.delay, ns.count, ns.label, ns.port) == (0.25, 7, "y", 1)
    assert isinstance(ns.delay, float)


def test_an_env_twin_is_parsed_with_the_fields_type() -> None:
    ns = _parser({"FILEWATCH_DELAY": "1.5", "FILEWATCH_P": "9"}).parse_args([])
    assert (ns.delay, ns.port) == (1.5, 9)
    with pytest.raises(ValueError, match="FILEWATCH_COUNT='many'"):
        _parser({"FILEWATCH_COUNT": "many"})


def test_a_bad_value_on_the_command_line_is_refused() -> None:
    with pytest.raises(argparse.ArgumentError, match="invalid int value"):
        _parser({}).parse_args(["--count", "1.5"])
