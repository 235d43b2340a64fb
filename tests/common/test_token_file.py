"""--token-file (env FILEWATCH_TOKEN_FILE) on both programs: the token off the command line."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aggregator.__main__
import aggregator.config
import watcher.__main__
import watcher.config
from common.flags import read_token_file

TOKEN = "s3cret-token"  # noqa: S105 - the tests' own


@dataclass(frozen=True)
class Program:
    """One of the two programs: its config module, its main and the prefix of its errors."""

    config: Any
    main: Callable[[list[str]], int]
    prog: str


PROGRAMS = [
    pytest.param(Program(watcher.config, watcher.__main__.main, "watcher"), id="watcher"),
    pytest.param(
        Program(aggregator.config, aggregator.__main__.main, "aggregator"), id="aggregator"
    ),
]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_token_comes_from_the_file_stripped(program: Program, token_file: Path) -> None:
    config = program.config
    cfg = config.from_args(["--token-file", str(token_file)], {})
    assert (cfg.token, cfg.token_file) == (TOKEN, str(token_file))
    from_env = config.from_args([], {"FILEWATCH_TOKEN_FILE": str(token_file)})
    assert from_env.token == TOKEN
    assert config.from_args([f"--token-file={token_file}"], {}).token == TOKEN
    assert config.from_args([], {}).token == ""  # no token, no file: none


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(lambda p: None, "cannot read it: No such file or directory", id="missing"),
        pytest.param(lambda p: p.write_text(" \n\t\n"), "is empty", id="empty"),
        pytest.param(lambda p: p.mkdir(), "cannot read it: Is a directory", id="a-folder"),
        pytest.param(lambda p: p.write_text("two\nlines"), "one line of printable", id="2-lines"),
        pytest.param(lambda p: p.write_bytes(b"caf\xc3\xa9"), "printable ASCII", id="non-ascii"),
    ],
)
def test_a_bad_token_file_is_one_clear_line_and_exit_2(
    program: Program,
    make: Callable[[Path], object],
    problem: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "the-token"
    make(path)
    with pytest.raises(ValueError, match=problem):
        program.config.from_args(["--token-file", str(path)], {})
    assert program.main(["--token-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"{program.prog}: --token-file {str(path)!r}") and problem in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_token_file(token_file: Path) -> None:
    token_file.chmod(0)
    with pytest.raises(ValueError, match="cannot read it: Permission denied"):
        read_token_file(str(token_file))


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(
    ("argv", "env"),
    [
        pytest.param(["--token", "x", "--token-file", "F"], {}, id="both-flags"),
        pytest.param(["--token-file", "F"], {"FILEWATCH_TOKEN": "x"}, id="env-token-and-file"),
        pytest.param(["--token", "x"], {"FILEWATCH_TOKEN_FILE": "F"}, id="token-and-env-file"),
    ],
)
def test_token_and_token_file_together_are_an_error(
    program: Program,
    argv: list[str],
    env: dict[str, str],
    token_file: Path,
) -> None:
    argv = [str(token_file) if a == "F" else a for a in argv]
    env = {k: str(token_file) if v == "F" else v for k, v in env.items()}
    with pytest.raises(ValueError, match=r"--token .* and --token-file .* exclude each other"):
        program.config.from_args(argv, env)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_says_to_prefer_the_file_or_the_variable(
    program: Program,
) -> None:
    text = " ".join(program.config.build_parser({}).format_help().split())
    assert "--token-file PATH" in text and "FILEWATCH_TOKEN_FILE" in text
    assert "(/proc/PID/cmdline): prefer --token-file or the FILEWATCH_TOKEN variable" in text
