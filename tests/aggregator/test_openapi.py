"""`GET /openapi.json`: the document is the routes, both ways, and is well formed.

The routes are read from the application a real `Aggregator` serves (so that a
route added anywhere in its composition counts); the document from the file the
package ships, and from the wire.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web

from aggregator.app import Aggregator
from aggregator.http_openapi import load_document
from tests.aggregator.grpc_support import BASE_CONFIG
from tests.support import HOST, ROOT

METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")


def _document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(load_document())
    return doc


@pytest.fixture
async def served() -> AsyncIterator[tuple[Aggregator, web.Application]]:
    """A started aggregator and the application its HTTP listeners serve."""
    aggregator = Aggregator(BASE_CONFIG)
    await aggregator.start()
    try:
        runner = aggregator._runner
        assert runner is not None
        yield aggregator, runner.app
    finally:
        await aggregator.stop()


def _registered(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every route of the application."""
    routes = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path = path.rstrip("/") + "/{filename}"
        routes.add((route.method.upper(), path))
    return routes


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in METHODS
        if method in item
    }


async def test_every_registered_route_is_documented_and_nothing_else(
    served: tuple[Aggregator, web.Application],
) -> None:
    registered = _registered(served[1])
    documented = _documented(_document())
    assert sorted(registered - documented) == [], "routes missing from aggregator/openapi.json"
    assert sorted(documented - registered) == [], "documented routes that are not served"
    # Every GET has its HEAD, documented and served.
    for method, path in registered:
        if method == "GET":
            assert ("HEAD", path) in registered, path


async def test_the_document_is_served_as_shipped(
    served: tuple[Aggregator, web.Application],
) -> None:
    base = f"http://{HOST}:{served[0].http_ports[0]}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/openapi.json") as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            body = await response.read()
        async with session.head(f"{base}/openapi.json") as response:
            assert response.status == 200
            assert await response.read() == b""
    assert body == (ROOT / "aggregator" / "openapi.json").read_bytes() == load_document()


def _walk(node: object) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_document_is_openapi_3_1_with_valid_schemas_and_references() -> None:
    doc = _document()
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    for schema in doc["components"]["schemas"].values():
        jsonschema_rs.meta.validate(schema)  # each a JSON Schema 2020-12
    for node in _walk(doc):
        if "$ref" in node:
            _resolve(doc, node["$ref"])
    operation_ids = [
        item[method]["operationId"]
        for item in doc["paths"].values()
        for method in METHODS
        if method in item
    ]
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                assert item[method]["responses"], (method, path)


def test_the_default_list_schema_is_exactly_the_documented_body() -> None:
    # The references point into #/components/schemas: here they are the schema's own $defs.
    text = json.dumps(_document()["components"]["schemas"])
    schemas = json.loads(text.replace("#/components/schemas/", "#/$defs/"))
    validator = jsonschema_rs.Draft202012Validator({**schemas["FileList"], "$defs": schemas})
    doc = {"files": [{"filename": "cat.jpg"}, {"filename": "dog.jpg"}]}
    assert validator.is_valid(doc)
    assert not validator.is_valid({**doc, "version": 1})
    assert not validator.is_valid({"files": [{"filename": "a", "node": "n"}]})


def test_the_document_ships_in_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "openapi.json" in pyproject["tool"]["setuptools"]["package-data"]["aggregator"]


def test_the_documented_static_files_are_the_ones_shipped() -> None:
    (parameter,) = _document()["paths"]["/static/{filename}"]["get"]["parameters"]
    shipped = {p.name for p in (ROOT / "aggregator" / "static").iterdir() if p.is_file()}
    assert set(parameter["schema"]["enum"]) == shipped
