"""Fixtures of the aggregator's gRPC tests: aggregators and channels to them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from aggregator.app import Aggregator
from tests.aggregator.grpc_support import BASE_CONFIG, AggregatorFactory, open_channel


@pytest.fixture
async def make_aggregator() -> AsyncIterator[AggregatorFactory]:
    """Aggregators started by the test, stopped last-started first."""
    started: list[Aggregator] = []

    async def factory(**overrides: Any) -> Aggregator:
        aggregator = Aggregator(replace(BASE_CONFIG, **overrides))
        started.append(aggregator)
        await aggregator.start()
        return aggregator

    try:
        yield factory
    finally:
        for aggregator in reversed(started):
            await aggregator.stop()


@pytest.fixture
async def aggregator(make_aggregator: AggregatorFactory) -> Aggregator:
    """An aggregator with the base config (TTL 1 s)."""
    return await make_aggregator()


@pytest.fixture
async def channel(aggregator: Aggregator) -> AsyncIterator[Any]:
    """A channel to the `aggregator` fixture."""
    async with open_channel(aggregator) as ch:
        yield ch
