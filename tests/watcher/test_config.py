"""The watcher's command line: the Go watcher's flags exactly, long forms, env twins."""

from __future__ import annotations

import re

import pytest

from watcher.config import WatcherConfig, build_parser, from_args

GO_AGGREGATOR = "http://127.0.0.1:8000"


def test_defaults() -> None:
    cfg = from_args([], {})
    assert (cfg.dir, cfg.port, cfg.aggregator) == (".", 4000, "grpc://127.0.0.1:50051")
    assert (cfg.protocol, cfg.targets) == ("grpc", ("grpc://127.0.0.1:50051",))
    assert cfg == WatcherConfig()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(
            ["-dir=sample-folders/folder1", "-p=4000", f"-aggregator={GO_AGGREGATOR}"],
            ("sample-folders/folder1", 4000, GO_AGGREGATOR),
            id="go-makefile-line",
        ),
        pytest.param(["-dir=/srv/data"], ("/srv/data", 4000, None), id="-dir=PATH"),
        pytest.param(["-dir", "/srv/data"], ("/srv/data", 4000, None), id="-dir PATH"),
        pytest.param(["-p=4001"], (".", 4001, None), id="-p=PORT"),
        pytest.param(["-p", "4001"], (".", 4001, None), id="-p PORT"),
        pytest.param([f"-aggregator={GO_AGGREGATOR}"], (".", 4000, GO_AGGREGATOR), id="-agg="),
        pytest.param(["-aggregator", GO_AGGREGATOR], (".", 4000, GO_AGGREGATOR), id="-agg URL"),
        pytest.param(["--dir", "/d"], ("/d", 4000, None), id="--dir PATH"),
        pytest.param(["--dir=/d"], ("/d", 4000, None), id="--dir=PATH"),
        pytest.param(["--port", "5"], (".", 5, None), id="--port PORT"),
        pytest.param(["--port=0"], (".", 0, None), id="--port=0"),
        pytest.param(
            ["--aggregator", "grpc://10.0.0.1:50051"],
            (".", 4000, "grpc://10.0.0.1:50051"),
            id="--aggregator URL",
        ),
        pytest.param(["-dir=/a=b"], ("/a=b", 4000, None), id="value-with-equals"),
        pytest.param(["-dir=/with space/x"], ("/with space/x", 4000, None), id="value-with-space"),
        pytest.param(["-dir=/first", "-dir=/last"], ("/last", 4000, None), id="last-wins"),
        pytest.param(
            ["-p", "4002", "-dir=/x", "--aggregator", GO_AGGREGATOR],
            ("/x", 4002, GO_AGGREGATOR),
            id="any-order-mixed-forms",
        ),
    ],
)
def test_go_watcher_flags(argv: list[str], expected: tuple[str, int, str | None]) -> None:
    cfg = from_args(argv, {})
    folder, port, aggregator = expected
    assert cfg.dir == folder
    assert cfg.port == port
    assert cfg.aggregator == (aggregator or WatcherConfig().aggregator)


@pytest.mark.parametrize(
    ("aggregator", "protocol", "targets"),
    [
        ("grpc://127.0.0.1:50051", "grpc", ("grpc://127.0.0.1:50051",)),
        ("http://127.0.0.1:8000", "http", ("http://127.0.0.1:8000",)),
        ("http://aggregator.example:80", "http", ("http://aggregator.example:80",)),
        ("grpc://[::1]:50051", "grpc", ("grpc://[::1]:50051",)),
        ("HTTP://127.0.0.1:8000", "http", ("http://127.0.0.1:8000",)),
        ("grpcs://a.example:443", "grpc", ("grpcs://a.example:443",)),
        (
            "grpc://a:50051, grpcs://b:50051",
            "grpc",
            ("grpc://a:50051", "grpcs://b:50051"),
        ),
    ],
)
def test_protocol_and_targets_from_scheme(
    aggregator: str, protocol: str, targets: tuple[str, ...]
) -> None:
    cfg = from_args([f"-aggregator={aggregator}"], {})
    assert cfg.protocol == protocol
    assert cfg.targets == targets


def test_several_aggregators_come_from_the_env_twin_too() -> None:
    cfg = from_args([], {"FILEWATCH_AGGREGATOR": "grpc://a:1,grpc://b:2"})
    assert cfg.targets == ("grpc://a:1", "grpc://b:2")


@pytest.mark.parametrize(
    "aggregator",
    [
        pytest.param("https://127.0.0.1:8000", id="https"),
        pytest.param("ftp://127.0.0.1:21", id="ftp"),
        pytest.param("ws://127.0.0.1:8000", id="ws"),
        pytest.param("127.0.0.1:8000", id="no-scheme"),
        pytest.param("grpc://127.0.0.1", id="no-port"),
        pytest.param("http://:8000", id="no-host"),
        pytest.param("", id="empty"),
        pytest.param("grpc://a:1,", id="empty-entry"),
        pytest.param("grpc://a:1,grpc://a:1", id="twice"),
        pytest.param("grpc://a:1,http://b:2", id="legacy-in-a-list"),
        pytest.param("http://a:1,http://b:2", id="two-legacy"),
        pytest.param("grpc://a:1/path", id="path"),
    ],
)
def test_bad_aggregator_raises_value_error(aggregator: str) -> None:
    with pytest.raises(ValueError, match="aggregator"):
        from_args([f"-aggregator={aggregator}"], {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-ca=ca.pem"], "need a grpcs://"),
        (["-aggregator=grpcs://a:1", "--tls-cert=c.pem"], "go together"),
        (["-aggregator=grpcs://a:1", "--tls-key=k.pem"], "go together"),
    ],
)
def test_tls_flags_need_a_grpcs_target_and_each_other(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_args(argv, {})


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        pytest.param({"FILEWATCH_DIR": "/env/dir"}, "dir", "/env/dir", id="dir"),
        pytest.param({"FILEWATCH_PORT": "4100"}, "port", 4100, id="port"),
        pytest.param(
            {"FILEWATCH_AGGREGATOR": GO_AGGREGATOR}, "aggregator", GO_AGGREGATOR, id="aggregator"
        ),
        pytest.param({"FILEWATCH_NAME": "node-a"}, "name", "node-a", id="name"),
        pytest.param({"FILEWATCH_TOKEN": "t"}, "token", "t", id="token"),
        pytest.param(
            {"FILEWATCH_RESCAN_INTERVAL": "0"}, "rescan_interval", 0.0, id="rescan-interval"
        ),
        pytest.param({"FILEWATCH_MAX_BATCH": "10"}, "max_batch", 10, id="max-batch"),
        pytest.param({"FILEWATCH_LOG_FORMAT": "kv"}, "log_format", "kv", id="log-format"),
    ],
)
def test_env_twins(env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(from_args([], env), field) == expected


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        pytest.param(["-dir=/flag"], "dir", "/flag", id="dir"),
        pytest.param(["-p", "4200"], "port", 4200, id="port"),
        pytest.param(["-aggregator=grpc://h:1"], "aggregator", "grpc://h:1", id="aggregator"),
        pytest.param(["--name", "flag-name"], "name", "flag-name", id="name"),
    ],
)
def test_flags_override_env(argv: list[str], field: str, expected: object) -> None:
    env = {
        "FILEWATCH_DIR": "/env",
        "FILEWATCH_PORT": "4100",
        "FILEWATCH_AGGREGATOR": GO_AGGREGATOR,
        "FILEWATCH_NAME": "env-name",
    }
    cfg = from_args(argv, env)
    assert getattr(cfg, field) == expected
    untouched = {"dir": "/env", "port": 4100, "aggregator": GO_AGGREGATOR, "name": "env-name"}
    del untouched[field]
    for other, value in untouched.items():
        assert getattr(cfg, other) == value


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["-p=70000"], id="port-too-big"),
        pytest.param(["-p=-1"], id="port-negative"),
        pytest.param(["--rescan-interval", "-1"], id="rescan-negative"),
        pytest.param(["--batch-delay", "-0.1"], id="batch-delay-negative"),
        pytest.param(["--batch-interval-max", "-0.1"], id="batch-interval-max-negative"),
        pytest.param(["--batch-interval-max", "nan"], id="batch-interval-max-nan"),
        pytest.param(["--heartbeat-interval", "0"], id="heartbeat-zero"),
        pytest.param(["--reconnect-min", "0"], id="reconnect-zero"),
        pytest.param(["--max-batch", "0"], id="max-batch-zero"),
        pytest.param(["--resend-buffer", "0"], id="resend-buffer-zero"),
        pytest.param(["--chunk-bytes", "0"], id="chunk-bytes-zero"),
        pytest.param(["--log-level", "trace"], id="log-level"),
        pytest.param(["--log-format", "xml"], id="log-format"),
    ],
)
def test_invalid_values_raise_value_error(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        from_args(argv, {})


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["-p=abc"], id="port-not-a-number"),
        pytest.param(["-p"], id="port-missing-value"),
        pytest.param(["-dir"], id="dir-missing-value"),
        pytest.param(["-d=/x"], id="no-abbreviation"),
        pytest.param(["-port=4000"], id="port-is-not-a-single-dash-flag"),
        pytest.param(["--rescan-interval", "often"], id="float-flag-word"),
        pytest.param(["stray"], id="positional"),
    ],
)
def test_unparsable_command_lines_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        from_args(argv, {})
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"FILEWATCH_PORT": "abc"}, id="port-not-a-number"),
        pytest.param({"FILEWATCH_PORT": "99999"}, id="port-too-big"),
        pytest.param({"FILEWATCH_AGGREGATOR": "https://h:1"}, id="bad-scheme"),
    ],
)
def test_invalid_env_values_raise_value_error(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        from_args([], env)


def test_help_names_go_flags_and_env_twins() -> None:
    text = " ".join(build_parser({}).format_help().split())
    for form in ("-dir", "-p", "-aggregator", "--dir", "--port", "--aggregator"):
        assert re.search(rf"(^|[\s,\[]){re.escape(form)}\b", text), form
    for twin in ("FILEWATCH_DIR", "FILEWATCH_PORT", "FILEWATCH_AGGREGATOR", "FILEWATCH_NAME"):
        assert twin in text
    flags = sorted(set(re.findall(r"--[a-z][a-z-]+", text)) - {"--help"})
    for flag in flags:
        assert "FILEWATCH_" + flag[2:].upper().replace("-", "_") in text, flag


@pytest.mark.parametrize("value", ["0", "-1"])
def test_hello_interval_must_be_positive(value: str) -> None:
    with pytest.raises(ValueError):
        from_args(["--hello-interval", value], {})
