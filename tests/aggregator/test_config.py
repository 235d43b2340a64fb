"""The aggregator's command line and environment."""

from __future__ import annotations

import re

import pytest

from aggregator.config import AggregatorConfig, build_parser, from_args, parse_hostport


def test_defaults_match_the_spec() -> None:
    cfg = from_args([], {})
    assert cfg.http == ("127.0.0.1:8000", "127.0.0.1:12345")
    assert cfg.grpc == "127.0.0.1:50051"
    assert cfg.ttl == 15.0
    assert cfg.token == ""
    assert cfg.legacy_networks == ("127.0.0.0/8", "::1/128")  # loopback by default
    assert cfg == AggregatorConfig()


@pytest.mark.parametrize(
    ("argv", "http"),
    [
        pytest.param(["--http", "0.0.0.0:9000"], ("0.0.0.0:9000",), id="one-replaces-both"),
        pytest.param(
            ["--http", "127.0.0.1:1", "--http=[::1]:2"], ("127.0.0.1:1", "[::1]:2"), id="repeated"
        ),
        pytest.param(["--http", "127.0.0.1:8000"], ("127.0.0.1:8000",), id="one-default-alone"),
    ],
)
def test_repeated_http_replaces_the_defaults(argv: list[str], http: tuple[str, ...]) -> None:
    assert from_args(argv, {}).http == http


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        pytest.param({"FILEWATCH_TTL": "3.5"}, "ttl", 3.5, id="ttl"),
        pytest.param({"FILEWATCH_GRPC": "0.0.0.0:1"}, "grpc", "0.0.0.0:1", id="grpc"),
        pytest.param(
            {"FILEWATCH_HTTP": "127.0.0.1:1, 127.0.0.1:2"},
            "http",
            ("127.0.0.1:1", "127.0.0.1:2"),
            id="http-comma-separated",
        ),
        pytest.param({"FILEWATCH_TOKEN": "s3cret"}, "token", "s3cret", id="token"),
        pytest.param({"FILEWATCH_LOG_LEVEL": "debug"}, "log_level", "debug", id="log-level"),
        pytest.param({"FILEWATCH_LOG_FORMAT": "json"}, "log_format", "json", id="log-format"),
        pytest.param({"FILEWATCH_MAX_WATCHERS": "7"}, "max_watchers", 7, id="max-watchers"),
        pytest.param(
            {"FILEWATCH_MAX_FILES_PER_WATCHER": "9"},
            "max_files_per_watcher",
            9,
            id="max-files-per-watcher",
        ),
        pytest.param({"FILEWATCH_READER_QUEUE": "5"}, "reader_queue", 5, id="reader-queue"),
        pytest.param(
            {"FILEWATCH_READER_WRITE_TIMEOUT": "2.5"},
            "reader_write_timeout",
            2.5,
            id="reader-write-timeout",
        ),
        pytest.param({"FILEWATCH_GRACE": "0"}, "grace", 0.0, id="grace-zero"),
        pytest.param(
            {"FILEWATCH_LEGACY_NETWORKS": "10.0.0.0/8, 127.0.0.1"},
            "legacy_networks",
            ("10.0.0.0/8", "127.0.0.1"),
            id="legacy-networks",
        ),
        pytest.param({"FILEWATCH_GAP_WAIT": "0.25"}, "gap_wait", 0.25, id="gap-wait"),
        pytest.param({"FILEWATCH_MAX_BODY_BYTES": "100"}, "max_body_bytes", 100, id="max-body"),
        pytest.param({"UNRELATED": "x", "TTL": "1"}, "ttl", 15.0, id="other-vars-ignored"),
    ],
)
def test_env_twins(env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(from_args([], env), field) == expected


@pytest.mark.parametrize(
    ("argv", "env", "field", "expected"),
    [
        pytest.param(["--ttl", "4"], {"FILEWATCH_TTL": "30"}, "ttl", 4.0, id="ttl"),
        pytest.param(
            ["--http", "127.0.0.1:3"],
            {"FILEWATCH_HTTP": "127.0.0.1:1,127.0.0.1:2"},
            "http",
            ("127.0.0.1:3",),
            id="http",
        ),
        pytest.param(
            ["--grpc=127.0.0.1:7"],
            {"FILEWATCH_GRPC": "127.0.0.1:6"},
            "grpc",
            "127.0.0.1:7",
            id="grpc",
        ),
        pytest.param(["--token", "b"], {"FILEWATCH_TOKEN": "a"}, "token", "b", id="token"),
        pytest.param(
            ["--log-level", "error"],
            {"FILEWATCH_LOG_LEVEL": "debug"},
            "log_level",
            "error",
            id="log-level",
        ),
    ],
)
def test_flags_override_env(
    argv: list[str], env: dict[str, str], field: str, expected: object
) -> None:
    assert getattr(from_args(argv, env), field) == expected


def test_flags_leave_other_env_twins_in_force() -> None:
    cfg = from_args(["--ttl", "4"], {"FILEWATCH_GRPC": "127.0.0.1:6", "FILEWATCH_TTL": "9"})
    assert (cfg.ttl, cfg.grpc) == (4.0, "127.0.0.1:6")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--ttl", "0"], id="ttl-zero"),
        pytest.param(["--ttl", "-1"], id="ttl-negative"),
        pytest.param(["--http", "nope"], id="http-no-port"),
        pytest.param(["--http", ":8000"], id="http-no-host"),
        pytest.param(["--http", "127.0.0.1:"], id="http-empty-port"),
        pytest.param(["--http", "127.0.0.1:65536"], id="http-port-too-big"),
        pytest.param(["--grpc", "127.0.0.1:x"], id="grpc-bad-port"),
        pytest.param(["--log-level", "loud"], id="log-level"),
        pytest.param(["--log-format", "xml"], id="log-format"),
        pytest.param(["--max-watchers", "0"], id="max-watchers"),
        pytest.param(["--max-files-per-watcher", "-5"], id="max-files"),
        pytest.param(["--max-readers", "0"], id="max-readers"),
        pytest.param(["--max-message-bytes", "0"], id="max-message-bytes"),
        pytest.param(["--reader-queue", "0"], id="reader-queue"),
        pytest.param(["--reader-write-timeout", "0"], id="reader-write-timeout"),
        pytest.param(["--reader-write-timeout", "inf"], id="reader-write-timeout-inf"),
        pytest.param(["--hello-timeout", "0"], id="hello-timeout"),
        pytest.param(["--keepalive", "-1"], id="keepalive"),
        pytest.param(["--grace", "-0.5"], id="grace"),
        pytest.param(["--legacy-networks", "not-a-network"], id="legacy-networks"),
        pytest.param(["--legacy-networks", "10.0.0.0/33"], id="legacy-networks-prefix"),
        pytest.param(["--fetch-timeout", "0"], id="fetch-timeout"),
        pytest.param(["--gap-wait", "-1"], id="gap-wait"),
        pytest.param(["--max-body-bytes", "0"], id="max-body-bytes"),
        pytest.param(["--max-list-bytes", "-1"], id="max-list-bytes"),
    ],
)
def test_invalid_values_raise_value_error(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        from_args(argv, {})


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--ttl", "soon"], id="ttl-not-a-number"),
        pytest.param(["--max-watchers", "1.5"], id="int-flag-float"),
        pytest.param(["--http"], id="http-missing-value"),
        pytest.param(["--no-such-flag"], id="unknown-flag"),
        pytest.param(["--tt", "5"], id="no-abbreviations"),
        pytest.param(["extra"], id="positional"),
    ],
)
def test_unparsable_command_lines_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        from_args(argv, {})
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"FILEWATCH_TTL": "soon"}, "FILEWATCH_TTL", id="ttl-not-a-number"),
        pytest.param({"FILEWATCH_TTL": "0"}, "ttl", id="ttl-zero"),
        pytest.param({"FILEWATCH_MAX_READERS": "1.5"}, "FILEWATCH_MAX_READERS", id="int-float"),
        pytest.param({"FILEWATCH_HTTP": " , "}, "http", id="http-empty-list"),
        pytest.param({"FILEWATCH_HTTP": "127.0.0.1"}, "HOST:PORT", id="http-no-port"),
    ],
)
def test_invalid_env_values_raise_value_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_args([], env)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:50051", ("::1", 50051)),
    ],
)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize(
    "value", ["8000", ":8000", "host:", "host:port", "host:-1", "host:70000", ""]
)
def test_parse_hostport_rejects(value: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|out of range"):
        parse_hostport(value)


def test_help_documents_every_env_twin() -> None:
    text = build_parser({}).format_help()
    flags = sorted(set(re.findall(r"--[a-z][a-z-]+", text)) - {"--help"})
    assert "--http" in flags
    assert "--ttl" in flags
    for flag in flags:
        twin = "FILEWATCH_" + flag[2:].upper().replace("-", "_")
        assert twin in text, f"{flag} has no documented env twin"


def test_help_shows_env_values_as_defaults() -> None:
    text = build_parser({"FILEWATCH_TTL": "42"}).format_help()
    assert "default: 42.0" in " ".join(text.split())


def test_nan_ttl_is_rejected() -> None:
    with pytest.raises(ValueError):
        from_args(["--ttl", "nan"], {})
