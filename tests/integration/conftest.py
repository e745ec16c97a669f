"""Fixtures the end-to-end modules share: a RabbitMQ vhost, and the broker to run on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import services
from tests.deployment import BROKERS


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[str]:
    """This module's RabbitMQ vhost (skips on a laptop without RabbitMQ, fails in CI)."""
    with services.rabbitmq_vhost() as url:
        yield url


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """Each test that asks for it runs twice: on Redis as the broker, and on RabbitMQ."""
    return redis_url if request.param == "redis" else str(request.getfixturevalue("rabbitmq"))
