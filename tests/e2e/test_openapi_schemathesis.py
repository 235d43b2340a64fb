"""Schemathesis against the live aggregator, every check on: it must find nothing.

A real aggregator process (127.0.0.1, port 0) with two watchers listing the
sample folders; schemathesis reads `GET /openapi.json` from it and sends what
the document allows and what it does not, to every operation: each answer must
have a documented status, content type, headers and body, a valid request must
be taken, an invalid one refused with a 4xx, a method a path does not take must
be a 405 with the right `Allow`, and nothing may be a 5xx. Its warnings fail
the run too.

The legacy endpoints get random bodies from the test's own loopback, which
needs no token: a random hello makes the aggregator fetch a list from a random
local port, which fails (or, on a watcher's port, succeeds); either is fine.
`GET /files/events` is left out: it is an endless stream, so no answer of its
ever ends; its HEAD (same parameters, same errors) is in.

By hand, against `make run`: the same command line, with
http://127.0.0.1:8000/openapi.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from tests.e2e.conftest import Cluster
from tests.support import ROOT

MAX_EXAMPLES = 100
"""Test cases per operation and phase: the run takes about 20 s."""
RUN_TIMEOUT = 120.0
ENDLESS = {"streamFileEvents": "GET /files/events"}
"""Operations not run (operationId: label): answers that never end."""
SELF = "GET /openapi.json"
"""Schemathesis does not test the operation it read the document from."""
METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")


def schemathesis_argv(url: str, config: Path, report: Path) -> list[str]:
    """The command line of one run against `url` (the document's URL), its JUnit report
    written to `report`."""
    return [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(config),
        "--no-color",
        "run", url,
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--generation-database", "none",
        "--request-timeout", "10",
        "--workers", "1",  # CPython 3.11: ast.parse in threads at once can fail
        "--report", "junit", "--report-junit-path", str(report),
        *(arg for op_id in ENDLESS for arg in ("--exclude-operation-id", op_id)),
    ]  # fmt: skip


def test_schemathesis_finds_nothing(cluster: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text("[warnings]\nfail-on = true\n")
    url = f"{cluster.aggregator.http_url}/openapi.json"
    report = tmp_path / "junit.xml"
    run = subprocess.run(
        schemathesis_argv(url, config, report),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found problems:\n{output[-20000:]}"
    assert "No issues found" in output, output[-5000:]
    document = json.loads((ROOT / "aggregator" / "openapi.json").read_text())
    documented = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in METHODS
        if method in item
    }
    # Schemathesis' own report, of the run just made.
    junit = ElementTree.parse(report)  # noqa: S314
    tested = {case.attrib["name"] for case in junit.iter("testcase")}
    assert tested == documented - set(ENDLESS.values()) - {SELF}, output[-5000:]
